#!/bin/bash
# bench/boot/disk.sh: guest disk throughput through a vhost-user-blk disk served by
# qemu-storage-daemon, under vmm-min and under QEMU (-M microvm,rtc=on -accel kvm), same daemon,
# kernel, initramfs, memory and command line, in the same tier: the KVM lab (real KVM, nested
# under TCG). The guest's /init runs /etc/colo/diskbench (busybox dd, O_DIRECT) when the command
# line has colo.diskbench=1. Prints a side-by-side table.
#
#   bench/boot/disk.sh
#
# On the host it re-runs itself inside scripts/kvm-lab.sh; inside the lab (KVM_LAB=1) it measures.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
if [ "${KVM_LAB:-}" != 1 ]; then
    cargo build --quiet -p vmm-min --manifest-path "$ROOT/Cargo.toml"
    "$ROOT/scripts/build-guest.sh" >/dev/null
    exec "$ROOT/scripts/kvm-lab.sh" -t 1500 -- "$HERE/disk.sh"
fi
GUEST="${COLO_CACHE:-$ROOT/.cache}/guest"
VMM="$ROOT/target/debug/vmm-min"
W="$(mktemp -d /tmp/bench-disk.XXXX)"
CMDLINE="console=ttyS0 quiet pci=noearly colo.services=none colo.diskbench=1"
QSD=""
cleanup() { [ -n "$QSD" ] && kill "$QSD" 2>/dev/null || true; }
trap cleanup EXIT

# run_bench NAME CMD...: fresh 128 MiB scratch image behind a fresh daemon, runs CMD (serial to
# $W/NAME.log) until COLO-DISKBENCH-DONE, keeps the COLO-DISKBENCH lines in $W/NAME.res.
run_bench() {
    local name="$1"; shift
    local log="$W/$name.log"; : > "$log"
    rm -f "$W/disk.img" "$W/blk.sock"; truncate -s 128M "$W/disk.img"
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$W/disk.img" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$W/blk.sock,writable=on" &
    QSD=$!
    for _ in $(seq 200); do [ -S "$W/blk.sock" ] && break; sleep 0.1; done
    "${@//@LOG@/$log}" > /dev/null 2> "$W/$name.err" &
    local pid=$!
    for _ in $(seq 9000); do
        grep -q COLO-DISKBENCH-DONE "$log" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    kill "$QSD" 2>/dev/null || true; wait "$QSD" 2>/dev/null || true; QSD=""
    grep -a '^COLO-DISKBENCH ' "$log" | tr -d '\r' > "$W/$name.res" || true
    echo "== $name" >&2; cat "$W/$name.res" >&2
    grep -q COLO-DISKBENCH-DONE "$log" || { echo "$name: no COLO-DISKBENCH-DONE; log tail:" >&2; tail -5 "$log" >&2; tail -5 "$W/$name.err" >&2; }
}

run_bench vmm "$VMM" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" \
    --cmdline "$CMDLINE" --memory 256M --serial "file:@LOG@" --disk "vhost-user,socket=$W/blk.sock"
run_bench qemu qemu-system-x86_64 -M microvm,rtc=on,memory-backend=mem -accel kvm -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on -nodefaults -no-user-config \
    -global virtio-mmio.force-legacy=false -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$CMDLINE" -serial "file:@LOG@" -display none \
    -chardev "socket,id=c0,path=$W/blk.sock" -device vhost-user-blk,chardev=c0

# value NAME PHASE KEY
value() { awk -v p="$2" -v k="$3" '$2 == p { for (i = 3; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2) }' "$W/$1.res"; }
echo "Guest disk throughput, KVM lab (nested KVM under TCG), 256 MiB, 1 vCPU, vhost-user-blk via"
echo "qemu-storage-daemon (128 MiB raw file in the lab, host page cache on), guest busybox dd O_DIRECT; random = 1 dd per 4 KiB request (fork-bound)"
printf '%-11s %-8s %-16s %-16s\n' phase unit vmm-min qemu-microvm
for p in seq-write seq-read rand-write rand-read rand-null; do
    case "$p" in seq-*) k=MiBps u=MiB/s ;; *) k=iops u=IOPS ;; esac
    printf '%-11s %-8s %-16s %-16s\n' "$p" "$u" "$(value vmm "$p" "$k")" "$(value qemu "$p" "$k")"
done
