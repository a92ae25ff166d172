#!/usr/bin/env bash
# The main job of colo on one machine. Today: builds the test guest and boots it under QEMU TCG
# (stock QEMU as the VMM; the colo processes take its place as they land), then talks to its
# services through user-mode networking port forwards. Bounded; cleans up everything it starts.
#
#   scripts/demo.sh              boot, exercise the services, stop
#   scripts/demo.sh --keep       same, then keep the guest running until Ctrl-C (or --timeout)
#   scripts/demo.sh --timeout S  overall deadline in seconds (default 300)
#
# Not built yet (the demo grows into this): the COLO pair on one machine, i.e. vmm-min running
# the primary and the secondary with vhost-net-colo, vhost-blk-colo and the comparer.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

keep=0 deadline=300
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) keep=1; shift ;;
        --timeout) [ $# -ge 2 ] || { echo "demo: --timeout needs seconds" >&2; exit 2; }; deadline="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
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

work="$(mktemp -d "${TMPDIR:-/tmp}/colo-demo.XXXXXX")"
qpid=""
cleanup() {
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { # a free TCP port on 127.0.0.1 (bash only)
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    say "no free port found"; exit 1
}
http=$(free_port) journal=$(free_port) echo_p=$(free_port)

# Under TCG the guest's TSC is the host's; tsc_early_khz avoids a PIT calibration that hangs the
# guest on a loaded host (see scripts/guest/README.md).
khz="$(awk '/^cpu MHz/ { printf "%d", $4 * 1000; exit }' /proc/cpuinfo)"
truncate -s 16M "$work/disk.img"
say "booting the guest under QEMU TCG (-M microvm); serial log $work/serial.log"
start=$SECONDS
qemu-system-x86_64 -M microvm -accel tcg -m 256 -nodefaults -no-user-config -display none \
    -kernel "$gdir/vmlinuz" -initrd "$gdir/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet ${khz:+tsc_early_khz=$khz}" \
    -serial "file:$work/serial.log" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$http-:80,hostfwd=tcp:127.0.0.1:$journal-:5000,hostfwd=tcp:127.0.0.1:$echo_p-:7" \
    -device virtio-net-device,netdev=n0 \
    -drive "if=none,id=d0,file=$work/disk.img,format=raw" -device virtio-blk-device,drive=d0 &
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
say "on the image (slot 1 at byte 512):"
dd if="$work/disk.img" bs=512 skip=1 count=1 2>/dev/null | tr -d '\0'
echo

if [ "$keep" = 1 ]; then
    say "guest kept running: HTTP 127.0.0.1:$http, echo 127.0.0.1:$echo_p, journal 127.0.0.1:$journal; Ctrl-C stops it (deadline ${deadline}s)"
    while kill -0 "$qpid" 2>/dev/null && [ $((SECONDS - start)) -lt "$deadline" ]; do sleep 1; done
fi
say "stopping the guest"
say "not built yet: the COLO pair (vmm-min primary+secondary, vhost-net-colo, vhost-blk-colo, comparer)"
