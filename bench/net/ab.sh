#!/bin/bash
# Interleaved A/B of guest TCP bulk throughput: vhost-net-colo (QEMU TCG as its vhost-user
# frontend, tap) against QEMU 7.2's own userspace virtio-net (tap, vhost=off), without and with
# the primary's COLO chain, the same guest in the TCG tier.
#
#   bench/net/ab.sh [--rounds N] [--slice-mib N] [--no-build] [--backend BIN]
#
# Why interleaved: this host's CPU speed moves by up to 2x within seconds (a fixed ALU loop
# takes 7-15 ms from one second to the next, machine idle, no steal reported), and the guest
# under TCG is CPU-bound, so two measurements taken a minute apart (bench/net/guest.sh runs
# its configurations one after the other) differ by that much whatever is measured. Here both
# guests run at once (the idle one costs little: a halted TCG vCPU sleeps) and each round
# moves --slice-mib MiB through one, then the other, in ABBA order, so the two halves of a
# round see nearly the same machine. Reported: each round's MiB/s of both and their ratio, the
# median ratio, and the medians of each side. Then the seed's chain is added to both at run
# time over QMP (filter-mirror m0 queue=tx outdev=mirror0; filter-redirector redire0 queue=rx
# indev=compare_out; filter-redirector redire1 queue=rx outdev=compare0, vnet_hdr_support on
# both sides, outdevs consumed by guestbench.py sink and relay as in guest.sh) and the rounds
# run again.
#
# PIN=1: both guests' vCPU threads on CPU 0 and every other thread (QEMU's other threads, the
# backend, the sinks and relays, the client) on CPU 1, the same for both sides.
# The bulk is guestbench.py's echo bulk (port 7, busybox `nc -e cat`, each way at once), a
# new connection per slice. Every process runs under nice and is killed by PID at the end; the
# namespaces are deleted.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/bench/net"
rounds=8 slice_mib=64 build=1 backend_bin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --slice-mib) slice_mib=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --backend) backend_bin=$2; build=0; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "ab.sh: needs root (namespaces, taps)" >&2; exit 1; }
for t in qemu-system-x86_64 python3 ip; do
    command -v "$t" >/dev/null || { echo "ab.sh: $t not installed" >&2; exit 1; }
done
NICE="nice -n 10"
cd "$root"
"$root/scripts/build-guest.sh" >/dev/null
gdir=$("$root/scripts/build-guest.sh" --print-dir)
[ "$build" = 1 ] && $NICE cargo build --release -q -p vhost-net-colo --bin vhost-net-colo
[ -n "$backend_bin" ] || backend_bin="$root/target/release/vhost-net-colo"
tsc_khz=$(awk '/^cpu MHz/ {printf "%d", $4*1000; exit}' /proc/cpuinfo)

work=$(mktemp -d /tmp/colo-netab.XXXXXX)
nss=() pids=()
# shellcheck source=lib.sh
. "$here/lib.sh"
cleanup() {
    local n
    stop_pids
    for n in "${nss[@]:-}"; do [ -n "$n" ] && ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_ns() { # SIDE: namespace colobSIDE$$ with bridge cbbr0 10.0.5.1/24 and an ifup script
    local ns="colob$1$$"
    ip netns add "$ns"
    nss+=("$ns")
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link add cbbr0 type bridge
    ip netns exec "$ns" ip addr add 10.0.5.1/24 dev cbbr0
    ip netns exec "$ns" ip link set cbbr0 up
    printf '#!/bin/sh\nip link set "$1" up\nip link set "$1" master cbbr0\n' >"$work/ifup.sh"
    chmod +x "$work/ifup.sh"
}
chardevs() { # SIDE OPTION: the seed's primary chardevs as unix sockets, into the array cd
    local c
    cd=()
    for c in mirror0 compare0 compare_out; do
        cd+=("$2" "socket,id=$c,path=$work/$1-$c.sock,server=on,wait=off")
    done
}
consumers() { # SIDE: the mirror sink and the compare0 -> compare_out relay
    wait_path "$work/$1-mirror0.sock" 30
    start "$1-sink" python3 "$here/guestbench.py" sink "$work/$1-mirror0.sock"
    start "$1-relay" python3 "$here/guestbench.py" relay "$work/$1-compare0.sock" "$work/$1-compare_out.sock"
}
qemu_guest() { # SIDE ARGS...: the guest under QEMU TCG in namespace colobSIDE$$
    local side=$1; shift
    start "g-$side" ip netns exec "colob$side$$" qemu-system-x86_64 \
        -M microvm,memory-backend=mem -accel tcg -m 256M \
        -nodefaults -no-user-config -display none \
        -object memory-backend-memfd,id=mem,size=256M,share=on \
        -global virtio-mmio.force-legacy=false \
        -kernel "$gdir/vmlinuz" -initrd "$gdir/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet tsc_early_khz=$tsc_khz colo.services=http,echo colo.ip=10.0.5.15/24 colo.gw=10.0.5.1" \
        -serial "file:$work/g-$side.serial" \
        -qmp "unix:$work/g-$side.qmp,server=on,wait=off" "$@"
}
wait_ready() { # SIDE
    local end=$((SECONDS + 300))
    until grep -q COLO-GUEST-READY "$work/g-$1.serial" 2>/dev/null; do
        [ $SECONDS -lt $end ] || { echo "ab.sh: guest $1 not ready" >&2; tail -5 "$work/g-$1.log" >&2; exit 1; }
        sleep 0.5
    done
    ip netns exec "colob$1$$" timeout 60 python3 "$here/guestbench.py" wait 10.0.5.15 7 50
}
add_chain() { # QMP_SOCKET
    local x=',"vnet_hdr_support":true'
    python3 "$here/guestbench.py" qmp "$1" \
        "{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-mirror\",\"id\":\"m0\",\"netdev\":\"hn0\",\"queue\":\"tx\",\"outdev\":\"mirror0\"$x}}" \
        "{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-redirector\",\"id\":\"redire0\",\"netdev\":\"hn0\",\"queue\":\"rx\",\"indev\":\"compare_out\"$x}}" \
        "{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-redirector\",\"id\":\"redire1\",\"netdev\":\"hn0\",\"queue\":\"rx\",\"outdev\":\"compare0\"$x}}"
}
client=()
slice() { # SIDE: MiB/s of one bulk echo slice
    "${client[@]}" ip netns exec "colob$1$$" python3 "$here/guestbench.py" bulk 10.0.5.15 7 "$slice_mib"
}
pin() { # PIN=1: both vCPU threads on CPU 0, every other thread this script starts on CPU 1
    [ "${PIN:-0}" = 1 ] || return 0
    local p side tid
    for p in "${pids[@]}"; do taskset -a -p -c 1 "$p" >/dev/null 2>&1 || true; done
    for side in O Q; do
        tid=$(QMP_PRINT=1 python3 "$here/guestbench.py" qmp "$work/g-$side.qmp" '{"execute":"query-cpus-fast"}' |
            python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[0]["thread-id"])')
        taskset -p -c 0 "$tid" >/dev/null
    done
    client=(taskset -c 1)
    echo "  pinned both vCPU threads to CPU 0, the rest to CPU 1" >&2
}

load0=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$SECONDS
# O: ours (vhost-net-colo on a tap in colobO$$, QEMU TCG as its frontend).
make_ns O
chardevs O --chardev
start backend ip netns exec "colobO$$" "$backend_bin" --socket "$work/vu.sock" \
    --qmp "unix:$work/be.qmp" --netdev "tap,id=hn0,ifname=cbt$$,script=$work/ifup.sh" "${cd[@]}"
wait_path "$work/vu.sock" 30
wait_path "$work/be.qmp" 30
consumers O
qemu_guest O -chardev "socket,id=c1,path=$work/vu.sock" -netdev vhost-user,id=n1,chardev=c1 \
    -device virtio-net-device,netdev=n1,mac=52:54:00:12:34:56
# Q: QEMU's own virtio-net on a tap (vnet_hdr=on, vhost=off) in colobQ$$.
make_ns Q
chardevs Q -chardev
qemu_guest Q -netdev "tap,id=hn0,ifname=cbq$$,script=$work/ifup.sh,downscript=no,vhost=off,vnet_hdr=on" \
    -device virtio-net-device,netdev=hn0,mac=52:54:00:12:34:56 "${cd[@]}"
consumers Q
wait_ready O
wait_ready Q
pin

results="$work/results"
: >"$results"
run_rounds() { # CHAIN
    local r o q
    for ((r = 1; r <= rounds; r++)); do
        if ((r % 2)); then o=$(slice O); q=$(slice Q); else q=$(slice Q); o=$(slice O); fi
        printf '%s\t%s\t%s\t%s\n' "$1" "$r" "$o" "$q" >>"$results"
        echo "  chain=$1 round $r: ours $o, QEMU $q MiB/s" >&2
    done
}
run_rounds no
add_chain "$work/be.qmp"
add_chain "$work/g-Q.qmp"
run_rounds yes
load1=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$results" "$load0" "$load1" "$((SECONDS - t_start))" "$slice_mib" <<'EOF'
import statistics, sys
path, l0, l1, secs, mib = sys.argv[1:]
rows = [l.split("\t") for l in open(path).read().splitlines() if l]
print("Tier: TCG (QEMU 7.2 -accel tcg -M microvm as the frontend of ours and as the reference); "
      f"1 vCPU, 256 MiB, the same guest; both guests up at once, rounds alternate ABBA. "
      f"Bulk echo slices of {mib} MiB (each way at once). Load average {l0} before, {l1} after; "
      f"{secs} s in all.")
print()
print("| COLO chain | rounds | ours MiB/s (median, min–max) | QEMU MiB/s (median, min–max) "
      "| ours / QEMU per round (median, min–max) | rounds ≥ target |")
print("|---|---:|---|---|---|---|")
for chain, target in (("no", 1.0), ("yes", 2.0)):
    rs = [r for r in rows if r[0] == chain]
    o = [float(r[2]) for r in rs]
    q = [float(r[3]) for r in rs]
    ratio = [a / b for a, b in zip(o, q)]
    met = sum(x >= target for x in ratio)
    print(f"| {chain} | {len(rs)} | {statistics.median(o):.1f} ({min(o):.1f}–{max(o):.1f}) "
          f"| {statistics.median(q):.1f} ({min(q):.1f}–{max(q):.1f}) "
          f"| {statistics.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f}) "
          f"| {met} of {len(rs)} ≥ {target:g}× |")
print()
print("Per round (MiB/s): " + "; ".join(
    f"{r[0]}#{r[1]} {float(r[2]):.0f}/{float(r[3]):.0f}" for r in rows))
EOF
