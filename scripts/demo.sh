#!/usr/bin/env bash
# The main job of colo on one machine, as far as it is built. Builds the test guest and our
# backends, then runs the guest under QEMU TCG (stock QEMU as the frontend, until vmm-min takes
# its place; this host's KVM cannot boot a stock Linux guest) with its network and disk in our
# vhost-user backends, set up with the seed's COLO disk commands:
#   - vhost-net-colo: user netdev with port forwards to the guest's services, and a filter-dump
#     of every frame the guest receives (pcap);
#   - vhost-blk-colo, secondary: replication drive (active and hidden overlays over the base),
#     nbd-server-start / nbd-server-add of colo-disk0;
#   - vhost-blk-colo, primary: quorum drive colo-disk0 with the guest's disk as its child,
#     drive_add of the replication child (NBD to the secondary) and x-blockdev-change.
# It talks to the guest's services, then stops the guest (QMP stop), runs the checkpoint's disk
# step (colo-blk-checkpoint on the secondary) and checks that the secondary's base equals the
# primary's disk byte for byte, and lets the guest go on. Bounded; cleans up everything it starts.
#
#   scripts/demo.sh              boot, exercise the services, checkpoint the disk, stop
#   scripts/demo.sh --keep       same, then keep the guest running until Ctrl-C (or --timeout)
#   scripts/demo.sh --timeout S  overall deadline in seconds (default 300)
#
# Not built yet (the demo grows into this): the COLO pair, i.e. vmm-min running the primary and
# the secondary, the network chain through the comparer, RAM checkpoints and failover.

set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

keep=0 deadline=300
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) keep=1; shift ;;
        --timeout) [ $# -ge 2 ] || { echo "demo: --timeout needs seconds" >&2; exit 2; }; deadline="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "demo: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$deadline" in ''|*[!0-9]*) echo "demo: --timeout must be a number of seconds" >&2; exit 2 ;; esac

say() { echo "demo: $*"; }
command -v qemu-system-x86_64 >/dev/null || { say "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"; exit 1; }
command -v busybox >/dev/null || { say "busybox missing (apt-get install busybox-static)"; exit 1; }

say "building the guest (scripts/build-guest.sh)"
"$repo/scripts/build-guest.sh"
gdir="$("$repo/scripts/build-guest.sh" --print-dir)"
say "building vhost-net-colo and vhost-blk-colo (cargo build)"
(cd "$repo" && cargo build -q -p vhost-net-colo -p vhost-blk-colo)
bin="$repo/target/debug"

work="$(mktemp -d "${TMPDIR:-/tmp}/colo-demo.XXXXXX")"
qpid="" pids=()
cleanup() {
    local p
    for p in $qpid "${pids[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            kill "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports below the kernel's ephemeral range: one inside it can be taken at any moment by an outgoing
# connection, which the probe below does not see (a CI run lost nbd-server-start's bind so).
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$ephemeral_low" -gt 21024 ] 2>/dev/null || ephemeral_low=32768
free_port() { # a TCP port on 127.0.0.1 nothing listens on (bash only)
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % (ephemeral_low - 20000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    say "no free port found"; exit 1
}
http=$(free_port) journal=$(free_port) echo_p=$(free_port)

# Under TCG the guest's TSC is the host's; tsc_early_khz avoids a PIT calibration that hangs the
# guest on a loaded host (see scripts/guest/README.md).
khz="$(awk '/^cpu MHz/ { printf "%d", $4 * 1000; exit }' /proc/cpuinfo)"
qmp() { # SOCKET JSON... (QMP_PRINT=1 prints the returns; fails on a QMP error)
    python3 "$repo/bench/net/guestbench.py" qmp "$@"
}
wait_sock() { # PATH PID
    local t=$SECONDS
    until [ -S "$1" ]; do
        kill -0 "$2" 2>/dev/null || { say "$(basename "$1"): its process exited"; exit 1; }
        [ $((SECONDS - t)) -lt 30 ] || { say "no $1 after 30 s"; exit 1; }
        sleep 0.1
    done
}
nbd=$(free_port)
truncate -s 16M "$work/disk.img"
cp "$work/disk.img" "$work/sec.img" # the secondary starts from the same disk (colo-blk-sync
                                      # would mirror it over NBD when it differs)

say "secondary disk: vhost-blk-colo, replication drive over active and hidden overlays, NBD :$nbd"
"$bin/vhost-blk-colo" --qmp "unix:$work/sec.qmp" \
    --drive "if=none,id=colo-disk0,driver=raw,file.filename=$work/sec.img" \
    --drive "id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0" \
    2>"$work/sec.log" &
pids+=($!); wait_sock "$work/sec.qmp" $!
qmp "$work/sec.qmp" \
    "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"inet\",\"data\":{\"host\":\"127.0.0.1\",\"port\":\"$nbd\"}}}}" \
    '{"execute":"nbd-server-add","arguments":{"device":"colo-disk0","writable":true}}' \
    '{"execute":"colo-blk-start"}'

say "primary disk: vhost-blk-colo, quorum colo-disk0 = the guest's disk + the replication child"
"$bin/vhost-blk-colo" --socket "$work/blk.sock" --qmp "unix:$work/pri.qmp" \
    --drive "driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename=$work/disk.img,children.0.driver=raw" \
    2>"$work/pri.log" &
pids+=($!); wait_sock "$work/pri.qmp" $!
wait_sock "$work/blk.sock" "${pids[-1]}"
# colo-blk-start: what QEMU's `migrate` with x-colo starts (the COLO frame will call it).
qmp "$work/pri.qmp" \
    "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,file.host=127.0.0.1,file.port=$nbd,file.export=colo-disk0,node-name=node0\"}}" \
    '{"execute":"x-blockdev-change","arguments":{"parent":"colo-disk0","node":"node0"}}' \
    '{"execute":"colo-blk-start"}'

say "network: vhost-net-colo, user netdev with port forwards, filter-dump of what the guest receives"
"$bin/vhost-net-colo" --socket "$work/net.sock" --qmp "unix:$work/net.qmp" \
    --netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$http-:80,hostfwd=tcp:127.0.0.1:$journal-:5000,hostfwd=tcp:127.0.0.1:$echo_p-:7" \
    --object "filter-dump,id=d0,netdev=n0,queue=tx,file=$work/guest-rx.pcap" \
    2>"$work/net.log" &
pids+=($!); wait_sock "$work/net.sock" $!

say "booting the guest under QEMU TCG (-M microvm, memfd memory shared with the backends); serial log $work/serial.log"
start=$SECONDS
qemu-system-x86_64 -M microvm,memory-backend=mem -accel tcg -m 256M -nodefaults -no-user-config -display none \
    -object memory-backend-memfd,id=mem,size=256M,share=on -global virtio-mmio.force-legacy=false \
    -kernel "$gdir/vmlinuz" -initrd "$gdir/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet ${khz:+tsc_early_khz=$khz}" \
    -serial "file:$work/serial.log" -qmp "unix:$work/vm.qmp,server=on,wait=off" \
    -chardev "socket,id=cn,path=$work/net.sock" -netdev vhost-user,id=n1,chardev=cn \
    -device virtio-net-device,netdev=n1,mac=52:54:00:12:34:56 \
    -chardev "socket,id=cb,path=$work/blk.sock" -device vhost-user-blk,chardev=cb,num-queues=1 &
qpid=$!

until grep -q COLO-GUEST-READY "$work/serial.log" 2>/dev/null; do
    kill -0 "$qpid" 2>/dev/null || { say "QEMU exited early"; cat "$work/serial.log" >&2; exit 1; }
    [ $((SECONDS - start)) -lt "$deadline" ] || { say "no READY within ${deadline}s"; cat "$work/serial.log" >&2; exit 1; }
    sleep 0.5
done
say "guest READY after $((SECONDS - start)) s (wall)"

ask() { # port request -> reply (bounded; busybox nc closes its sending side at end of input)
    printf '%b' "$2" | timeout 30 busybox nc 127.0.0.1 "$1" || say "(no complete answer on port $1)"
}
say "HTTP GET / :"
ask "$http" 'GET / HTTP/1.0\r\n\r\n' | sed -n '/^\r$/,$p' | tail -n +2
say "HTTP GET /cgi-bin/uptime : $(ask "$http" 'GET /cgi-bin/uptime HTTP/1.0\r\n\r\n' | tail -n 1)"
say "echo: $(ask "$echo_p" 'hello colo\n')"
say "journal:"
ask "$journal" "APPEND demo record at $(date -u +%FT%TZ)\nQUERY\n"
say "on the primary's image (slot 1 at byte 512):"
dd if="$work/disk.img" bs=512 skip=1 count=1 2>/dev/null | tr -d '\0'
echo

say "checkpoint, disk step: guest stopped, secondary's active and hidden disks emptied"
qmp "$work/vm.qmp" '{"execute":"stop"}'
qmp "$work/sec.qmp" '{"execute":"colo-blk-checkpoint"}'
if cmp -s "$work/disk.img" "$work/sec.img"; then
    say "the secondary's base equals the primary's disk byte for byte ($(stat -c %s "$work/disk.img") bytes)"
else
    say "MISMATCH: the secondary's base differs from the primary's disk; first differing bytes:"
    cmp -l "$work/disk.img" "$work/sec.img" | head -n 5 || true
    tail -n 5 "$work/pri.log" "$work/sec.log" >&2
    exit 1
fi
qmp "$work/vm.qmp" '{"execute":"cont"}'
say "guest running again: echo: $(ask "$echo_p" 'still here\n'); journal:"
ask "$journal" "APPEND after the checkpoint\nQUERY\n"
say "replication status on the primary:"
QMP_PRINT=1 qmp "$work/pri.qmp" '{"execute":"colo-blk-status"}' | cut -c1-400
say "filter-dump wrote $(stat -c %s "$work/guest-rx.pcap") bytes of pcap (the frames the guest received)"

if [ "$keep" = 1 ]; then
    say "guest kept running: HTTP 127.0.0.1:$http, echo 127.0.0.1:$echo_p, journal 127.0.0.1:$journal; Ctrl-C stops it (deadline ${deadline}s)"
    while kill -0 "$qpid" 2>/dev/null && [ $((SECONDS - start)) -lt "$deadline" ]; do sleep 1; done
fi
say "stopping the guest and the backends"
say "not built yet: the COLO pair (vmm-min primary and secondary), the comparer in the network path, RAM checkpoints, failover"
