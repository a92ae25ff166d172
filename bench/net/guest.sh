#!/bin/bash
# Guest TCP throughput and request latency through vhost-net-colo against QEMU 7.2's own
# userspace virtio-net, the same guest (scripts/build-guest.sh) in the same tier, each without
# and with the primary's COLO chain. Prints one markdown table naming the tier.
#
#   bench/net/guest.sh [--configs "ours-user ours-tap qemu-user qemu-tap qemu-tap-novnet"]
#                      [--bulk-mib N] [--rtt N] [--http N] [--no-build] [--backend BIN]
#                      [--tier tcg|kvm] [--vmm BIN] [--ours-device-opts ,event_idx=off]
#
# Tier TCG (this host): QEMU 7.2 -accel tcg -M microvm (1 vCPU, 256 MiB, memfd memory) boots the
# guest in every configuration:
#   ours-user   QEMU as vhost-user frontend, vhost-net-colo --netdev user,hostfwd (client on
#               127.0.0.1)
#   ours-tap    QEMU as vhost-user frontend, vhost-net-colo --netdev tap in a namespace with a
#               bridge this script creates (client inside the namespace); its filters get
#               vnet_hdr_support=on, as QEMU's in qemu-tap (GSO frames cross the chain whole)
#   qemu-tap    QEMU's own virtio-net-device on -netdev tap,vhost=off (vnet_hdr on: offloads),
#               same namespace set-up; its filters get vnet_hdr_support=on (the COLO set-up
#               that keeps offloads)
#   qemu-tap-novnet  the same with vnet_hdr=off on the tap and the filters as the seed has them
#               (the seed recipe's other working set-up)
#   qemu-user   QEMU's own virtio-net-device on -netdev user (libslirp) with the same hostfwd
#               rules as ours-user (client on 127.0.0.1): the reference for our user netdev
# Tier KVM (--tier kvm; real KVM, e.g. inside the lab, see bench/net/lab.sh): the same with
# vmm-min (1 vCPU, 256 MiB) as the frontend of ours and QEMU -accel kvm -M microvm as the
# reference.
# In each configuration the guest is measured, then the primary's chain of the seed is added at
# run time over QMP (filter-mirror m0 queue=tx outdev=mirror0; filter-redirector redire0
# queue=rx indev=compare_out; filter-redirector redire1 queue=rx outdev=compare0), and measured
# again. The outdevs are consumed as in COLO without a secondary: mirror0 by a sink, compare0 is
# relayed byte for byte to compare_out (a comparer that releases everything at once, with an
# unbounded queue between its reading and writing sides: guestbench.py relay; socat -u
# deadlocks QEMU, whose blocking chardev write stops it reading compare_out).
#
# What is measured (bench/net/guestbench.py): bulk echo (port 7, busybox `nc -e cat`: the bytes
# go to the guest and back at once; MiB/s each way), echo round trips of 64-byte lines on one
# connection (p50/p99), HTTP GET / with a new connection each (busybox httpd, p50/p99).
# Every process runs under nice and is killed by PID at the end; the namespace is deleted.
#
# Profiling (the same for every configuration): PROFILE_DIR=DIR writes, per measurement, the
# CPU time of every thread of every process this script started (DIR/<cfg>-<chain>.cpu, from
# /proc, with the MiB moved), and PROFILE_PERF="stat" or "record" runs the measurement under
# `perf stat -a` (context switches, migrations, cycles) or `perf record -a -g` (DIR/...perf*);
# "sched" records every context switch (DIR/...sched.data: who preempts the vCPU thread).
# In the KVM tier, DIR/<cfg>-<chain>.cpu also gets L1's KVM counts per MiB (debugfs per-VM stats;
# with PROFILE_PERF=kvm: exits by SVM exit code, MSR and MMIO exits, interrupts; see
# bench/net/kvmprof.sh), the same for vmm-min and QEMU.
# With PROFILE_DIR, DIR/<cfg>-<chain>.guest0/1 also hold the guest kernel's own counters before
# and after (TCP/IP statistics, CPU time by kind, softirqs, interrupts: GET /cgi-bin/kstat).
# PROFILE_ALL=1 (with PROFILE_DIR): the CPU snapshot covers every process and thread on the host
# (kernel threads such as ksoftirqd included) and /proc/stat per CPU (idle, softirq...).
# CHAIN=full|mirror|redirect (default full): the chain measured second, for every
# configuration: the seed's three filters, only filter-mirror m0, or only the two redirectors
# (redire0, redire1 with the relay), to tell what each part costs.
# PIN=1 (TCG tier, a diagnostic): after boot the guest's vCPU thread (QMP query-cpus-fast) is
# pinned to CPU 0 and every other thread this script starts (QEMU's other threads, the backend,
# the sink, the relay, the client) to CPU 1, the same for every configuration.
# PROFILE_TRACE=1 (TCG tier) adds DIR/...trace0/1: the guest's virtio-mmio interrupts and
# QEMU-handled queue notifies before/after, from QEMU's trace log (costs QEMU some CPU).
# Use a large --bulk-mib and small --rtt/--http so the bulk phase dominates.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/bench/net"
configs="ours-user ours-tap qemu-tap"
bulk_mib=8 rtt_n=200 http_n=30 build=1 backend_bin="" tier=tcg vmm_bin="" ours_dev=""
while [ $# -gt 0 ]; do
    case "$1" in
        --configs) configs=$2; shift 2 ;;
        --bulk-mib) bulk_mib=$2; shift 2 ;;
        --rtt) rtt_n=$2; shift 2 ;;
        --http) http_n=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --tier) tier=$2; shift 2 ;;
        --vmm) vmm_bin=$2; shift 2 ;;
        --ours-device-opts) ours_dev=$2; shift 2 ;;
        --backend) backend_bin=$2; build=0; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "guest.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "guest.sh: needs root (namespaces, taps)" >&2; exit 1; }
for t in qemu-system-x86_64 python3 ip; do
    command -v "$t" >/dev/null || { echo "guest.sh: $t not installed" >&2; exit 1; }
done
NICE="nice -n 10"
BOOT_DEADLINE=${BOOT_DEADLINE:-300}

cd "$root"
"$root/scripts/build-guest.sh" >/dev/null
gdir=$("$root/scripts/build-guest.sh" --print-dir)
if [ "$build" = 1 ]; then
    $NICE cargo build --release -q -p vhost-net-colo --bin vhost-net-colo
    [ "$tier" = kvm ] && $NICE cargo build --release -q -p vmm-min --bin vmm-min
fi
[ -n "$vmm_bin" ] || vmm_bin="$root/target/release/vmm-min"
case "$tier" in
    tcg) accel=(-M microvm,memory-backend=mem -accel tcg)
         tier_name="TCG (QEMU 7.2 -accel tcg -M microvm as the frontend of ours and as the reference)" ;;
    kvm) accel=(-M microvm,rtc=on,memory-backend=mem -accel kvm -cpu host)
         tier_name="KVM (vmm-min as the frontend of ours; QEMU 7.2 -accel kvm -M microvm as the reference)" ;;
    *) echo "guest.sh: --tier tcg|kvm" >&2; exit 2 ;;
esac
[ -n "$backend_bin" ] || backend_bin="$root/target/release/vhost-net-colo"
tsc_khz=$(awk '/^cpu MHz/ {printf "%d", $4*1000; exit}' /proc/cpuinfo)

work=$(mktemp -d /tmp/colo-netbench.XXXXXX)
ns=""
pids=()
# shellcheck source=lib.sh
. "$here/lib.sh"
cleanup() {
    stop_pids
    [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
in_ns() { ip netns exec "$ns" "$@"; }
make_ns() {
    ns="colobench$$"
    ip netns add "$ns"
    in_ns ip link set lo up
    in_ns ip link add cbbr0 type bridge
    in_ns ip addr add 10.0.5.1/24 dev cbbr0
    in_ns ip link set cbbr0 up
    printf '#!/bin/sh\nip link set "$1" up\nip link set "$1" master cbbr0\n' >"$work/ifup.sh"
    chmod +x "$work/ifup.sh"
}
del_ns() { [ -n "$ns" ] && ip netns del "$ns"; ns=""; }

base_append() {
    if [ "$tier" = tcg ]; then
        echo "console=ttyS0 quiet tsc_early_khz=$tsc_khz colo.services=http,echo"
    else
        echo "console=ttyS0 quiet pci=noearly 8250.nr_uarts=1 colo.services=http,echo"
    fi
}
# QEMU microvm with the guest; $1 name, $2 extra kernel args, rest: netdev/device args.
qemu_guest() {
    local name=$1 extra=$2; shift 2
    local pre=() trace=()
    [ "${QEMU_IN_NS:-0}" = 1 ] && pre=(ip netns exec "$ns")
    # PROFILE_TRACE=1: the virtio-mmio interrupts raised and the queue notifies (guest kicks)
    # QEMU's device handled, counted per measurement from QEMU's trace log (interrupts: both
    # configurations; kicks: QEMU's own virtio-net only, a vhost-user kick goes to the
    # backend's eventfd, see query-net tx_kicks)
    [ "${PROFILE_TRACE:-0}" = 1 ] && trace=(-trace enable=virtio_mmio_setting_irq
        -trace enable=virtio_mmio_write_offset -D "$work/trace.log")
    start "$name" "${pre[@]}" qemu-system-x86_64 "${accel[@]}" -m 256M \
        -nodefaults -no-user-config -display none \
        -object memory-backend-memfd,id=mem,size=256M,share=on \
        -global virtio-mmio.force-legacy=false \
        -kernel "$gdir/vmlinuz" -initrd "$gdir/initramfs.cpio.gz" \
        -append "$(base_append) $extra" \
        -serial "file:$work/$name.serial" \
        -qmp "unix:$work/$name.qmp,server=on,wait=off" "${trace[@]}" "$@"
}
# The frontend of ours: QEMU (tcg) or vmm-min (kvm); $1 name, $2 extra kernel args.
ours_guest() {
    local name=$1 extra=$2
    if [ "$tier" = tcg ]; then
        qemu_guest "$name" "$extra" -chardev "socket,id=c1,path=$work/vu.sock" \
            -netdev vhost-user,id=n1,chardev=c1 -device "virtio-net-device,netdev=n1,mac=52:54:00:12:34:56$ours_dev"
    else
        start "$name" "$vmm_bin" --kernel "$gdir/vmlinuz" --initrd "$gdir/initramfs.cpio.gz" \
            --cmdline "$(base_append) $extra" --memory 256M --cpus 1 \
            --serial "file:$work/$name.serial" \
            --net "vhost-user,socket=$work/vu.sock,mac=52:54:00:12:34:56"
    fi
}
wait_ready() { # NAME
    local end=$((SECONDS + BOOT_DEADLINE)) t0=$SECONDS
    until grep -q COLO-GUEST-READY "$work/$1.serial" 2>/dev/null; do
        [ $SECONDS -lt $end ] || { echo "guest.sh: $1 not ready in $BOOT_DEADLINE s" >&2; tail -5 "$work/$1.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "  $1 ready after $((SECONDS - t0)) s" >&2
}
chardevs() { # the seed's primary chardevs, as unix sockets in $work, into the array cd
    # (no process substitution: the KVM lab has no /dev/fd)
    local c
    cd=()
    for c in mirror0 compare0 compare_out; do
        cd+=("$1" "socket,id=$c,path=$work/$c.sock,server=on,wait=off")
    done
}
consumers() { # the mirror sink and the compare0 -> compare_out relay
    wait_path "$work/mirror0.sock" 30
    start sink python3 "$here/guestbench.py" sink "$work/mirror0.sock"
    start relay python3 "$here/guestbench.py" relay "$work/compare0.sock" "$work/compare_out.sock"
    sleep 0.5
}
chain=${CHAIN:-full}
case "$chain" in full|mirror|redirect) ;; *) echo "guest.sh: CHAIN=full|mirror|redirect" >&2; exit 2 ;; esac
add_chain() { # QMP_SOCKET EXTRA_JSON_FIELDS (the filters CHAIN names)
    local x=${2:-} cmds=()
    [ "$chain" = redirect ] ||
        cmds+=("{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-mirror\",\"id\":\"m0\",\"netdev\":\"hn0\",\"queue\":\"tx\",\"outdev\":\"mirror0\"$x}}")
    [ "$chain" = mirror ] ||
        cmds+=("{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-redirector\",\"id\":\"redire0\",\"netdev\":\"hn0\",\"queue\":\"rx\",\"indev\":\"compare_out\"$x}}"
               "{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"filter-redirector\",\"id\":\"redire1\",\"netdev\":\"hn0\",\"queue\":\"rx\",\"outdev\":\"compare0\"$x}}")
    python3 "$here/guestbench.py" qmp "$1" "${cmds[@]}"
}
pin_guest() { # NAME: PIN=1, see the header
    [ "${PIN:-0}" = 1 ] || return 0
    local p tid
    for p in "${pids[@]}"; do taskset -a -p -c 1 "$p" >/dev/null 2>&1 || true; done
    tid=$(QMP_PRINT=1 python3 "$here/guestbench.py" qmp "$work/$1.qmp" '{"execute":"query-cpus-fast"}' |
        python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[0]["thread-id"])')
    taskset -p -c 0 "$tid" >/dev/null
    echo "  pinned vCPU thread $tid to CPU 0, the rest to CPU 1" >&2
}
trace_counts() { # guest interrupts raised and queue notifies so far (PROFILE_TRACE)
    awk '/virtio_mmio_setting_irq/ && / 1$/ {irq++} /virtio_mmio_write_offset/ && /offset 0x50/ {kick++}
         END {printf "irq_raised %d\nqueue_notify %d\n", irq, kick}' "$work/trace.log"
}
results="$work/results"
: >"$results"
measure() { # LABEL CHAIN HOST ECHO HTTP [in_ns]
    local label=$1 chain=$2 host=$3 echo=$4 http=$5 pre=()
    [ "${6:-}" = ns ] && pre=(ip netns exec "$ns")
    local j ok=1 ptag="" perf=()
    [ "${PIN:-0}" = 1 ] && pre=(taskset -c 1 "${pre[@]}")
    "${pre[@]}" timeout 60 python3 "$here/guestbench.py" wait "$host" "$echo" 50 \
        2>"$work/err" || ok=0
    if [ $ok = 1 ] && [ -n "${PROFILE_DIR:-}" ]; then
        mkdir -p "$PROFILE_DIR"
        ptag="$PROFILE_DIR/$cfg-$chain"
        snap=("${pids[@]}")
        [ "${PROFILE_ALL:-0}" = 1 ] && snap=(all)
        python3 "$here/guestbench.py" cpusnap "${snap[@]}" >"$ptag.cpu0"
        "${pre[@]}" python3 "$here/guestbench.py" get "$host" "$http" /cgi-bin/kstat >"$ptag.guest0" || true
        [ -e "$work/trace.log" ] && trace_counts >"$ptag.trace0"
        [ -e "$work/be.qmp" ] && QMP_PRINT=1 python3 "$here/guestbench.py" qmp "$work/be.qmp" \
            '{"execute":"query-net"}' >"$ptag.net0"
        if [ "$tier" = kvm ]; then
            "$here/kvmprof.sh" mount || true
            "$here/kvmprof.sh" snap >"$ptag.kvm0" || true
        fi
        case "${PROFILE_PERF:-}" in
            stat) perf=(perf stat -a -e context-switches,cpu-migrations,cycles,task-clock
                        -o "$ptag.perfstat" --) ;;
            record) perf=(perf record -q -a -g -o "$ptag.perf.data" --) ;;
            sched) perf=(perf record -q -a -e sched:sched_switch -o "$ptag.sched.data" --) ;;
            kvm) # KVM tier: exits by reason, MSRs, MMIO, interrupts (bench/net/kvmprof.sh)
                local kargs
                kargs=$("$here/kvmprof.sh" perf-args "$ptag.kvmperf")
                mapfile -t perf <<<"$kargs"
                perf=(perf "${perf[@]}" --) ;;
        esac
    fi
    if [ $ok = 0 ] ||
        ! j=$("${perf[@]}" "${pre[@]}" timeout 600 python3 "$here/guestbench.py" measure \
            "$host" "$echo" "$http" --bulk-mib "$bulk_mib" --rtt "$rtt_n" --http "$http_n" \
            2>"$work/err"); then
        j=$(python3 -c 'import json,sys; print(json.dumps({"error": sys.argv[1]}))' \
            "$(tail -n 1 "$work/err" | cut -c1-200)")
    fi
    if [ -n "$ptag" ]; then
        python3 "$here/guestbench.py" cpusnap "${snap[@]}" >"$ptag.cpu1"
        "${pre[@]}" python3 "$here/guestbench.py" get "$host" "$http" /cgi-bin/kstat >"$ptag.guest1" || true
        [ -e "$work/trace.log" ] && trace_counts >"$ptag.trace1"
        [ -e "$work/be.qmp" ] && QMP_PRINT=1 python3 "$here/guestbench.py" qmp "$work/be.qmp" \
            '{"execute":"query-net"}' >"$ptag.net1"
        python3 "$here/guestbench.py" cpudiff "$ptag.cpu0" "$ptag.cpu1" "$bulk_mib" >"$ptag.cpu"
        if [ "$tier" = kvm ]; then
            "$here/kvmprof.sh" snap >"$ptag.kvm1" || true
            "$here/kvmprof.sh" report "$ptag.kvm0" "$ptag.kvm1" "$ptag.kvmperf" "$bulk_mib" \
                >>"$ptag.cpu" || true
        fi
        echo "$j" >>"$ptag.cpu"
    fi
    echo "  $label chain=$chain: $j" >&2
    printf '%s\t%s\t%s\n' "$label" "$chain" "$j" >>"$results"
}

ours_label=""
[ -n "$ours_dev" ] && ours_label=" (frontend device$(echo "$ours_dev" | tr , ' '))"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$SECONDS
for cfg in $configs; do
    echo "== $cfg" >&2
    case "$cfg" in
        ours-user)
            e=$(free_port); h=$(free_port)
            chardevs --chardev
            start backend "$backend_bin" --socket "$work/vu.sock" --qmp "unix:$work/be.qmp" \
                --netdev "user,id=hn0,hostfwd=tcp:127.0.0.1:$e-:7,hostfwd=tcp:127.0.0.1:$h-:80" \
                "${cd[@]}"
            wait_path "$work/vu.sock" 30; wait_path "$work/be.qmp" 30
            consumers
            ours_guest g-ours-user ""
            wait_ready g-ours-user
            pin_guest g-ours-user
            measure "vhost-net-colo, user (hostfwd)$ours_label" no 127.0.0.1 "$e" "$h"
            add_chain "$work/be.qmp"
            measure "vhost-net-colo, user (hostfwd)$ours_label" yes 127.0.0.1 "$e" "$h"
            ;;
        ours-tap)
            make_ns
            chardevs --chardev
            start backend ip netns exec "$ns" "$backend_bin" --socket "$work/vu.sock" \
                --qmp "unix:$work/be.qmp" \
                --netdev "tap,id=hn0,ifname=cbt$$,script=$work/ifup.sh" "${cd[@]}"
            wait_path "$work/vu.sock" 30; wait_path "$work/be.qmp" 30
            consumers
            ours_guest g-ours-tap "colo.ip=10.0.5.15/24 colo.gw=10.0.5.1"
            wait_ready g-ours-tap
            pin_guest g-ours-tap
            measure "vhost-net-colo, tap on a bridge$ours_label" no 10.0.5.15 7 80 ns
            add_chain "$work/be.qmp" ',"vnet_hdr_support":true'
            measure "vhost-net-colo, tap on a bridge$ours_label" yes 10.0.5.15 7 80 ns
            ;;
        qemu-user)
            e=$(free_port); h=$(free_port)
            chardevs -chardev
            qemu_guest g-qemu-user "" \
                -netdev "user,id=hn0,hostfwd=tcp:127.0.0.1:$e-:7,hostfwd=tcp:127.0.0.1:$h-:80" \
                -device virtio-net-device,netdev=hn0,mac=52:54:00:12:34:56 "${cd[@]}"
            consumers
            wait_ready g-qemu-user
            pin_guest g-qemu-user
            measure "QEMU virtio-net, user (slirp, hostfwd)" no 127.0.0.1 "$e" "$h"
            add_chain "$work/g-qemu-user.qmp"
            measure "QEMU virtio-net, user (slirp, hostfwd)" yes 127.0.0.1 "$e" "$h"
            ;;
        qemu-tap|qemu-tap-novnet)
            make_ns
            vnet=on x=',"vnet_hdr_support":true' label="QEMU virtio-net, tap vhost=off"
            if [ "$cfg" = qemu-tap-novnet ]; then
                vnet=off x="" label="QEMU virtio-net, tap vhost=off vnet_hdr=off"
            fi
            chardevs -chardev
            QEMU_IN_NS=1 qemu_guest "g-$cfg" "colo.ip=10.0.5.15/24 colo.gw=10.0.5.1" \
                -netdev "tap,id=hn0,ifname=cbq$$,script=$work/ifup.sh,downscript=no,vhost=off,vnet_hdr=$vnet" \
                -device virtio-net-device,netdev=hn0,mac=52:54:00:12:34:56 "${cd[@]}"
            consumers
            wait_ready "g-$cfg"
            pin_guest "g-$cfg"
            measure "$label" no 10.0.5.15 7 80 ns
            add_chain "$work/g-$cfg.qmp" "$x"
            measure "$label" yes 10.0.5.15 7 80 ns
            ;;
        *) echo "guest.sh: unknown config $cfg" >&2; exit 2 ;;
    esac
    stop_pids
    del_ns
    rm -f "$work"/*.sock "$work"/*.qmp
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$results" "$load0" "$load1" "$((SECONDS - t_start))" "$bulk_mib" "$rtt_n" "$http_n" "$tier_name" "$chain" <<'EOF'
import json, sys
path, l0, l1, secs, mib, nr, nh, tier, chain = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
print(f"Tier: {tier}; 1 vCPU, 256 MiB, the same guest everywhere. Load average {l0} before, "
      f"{l1} after; {secs} s in all.")
print(f"COLO chain: {chain}.") if chain != "full" else None
print(f"Bulk echo {mib} MiB (each way at once); echo round trips: {nr} x 64 B; HTTP GET /: {nh}.")
print()
print("| frontend / netdev | COLO chain | bulk echo (MiB/s) | echo RTT p50 / p99 (µs) | HTTP GET p50 / p99 (ms) |")
print("|---|---|---|---|---|")
for label, chain, j in rows:
    r = json.loads(j)
    if "error" in r:
        why = r["error"].strip() or "no answer within the deadline"
        print(f"| {label} | {chain} | failed: {why} | | |")
        continue
    nr_, nh_ = r.get("rtt_n", int(nr)), r.get("http_n", int(nh))
    short = lambda k, want: "" if k >= int(want) else f" (only {k} in 60 s)"
    print(f"| {label} | {chain} | {r['bulk_mibs']} | {r['rtt_p50_us']} / {r['rtt_p99_us']}"
          f"{short(nr_, nr)} | {r['http_p50_ms']} / {r['http_p99_ms']}{short(nh_, nh)} |")
EOF
