#!/bin/bash
# bench/boot/run.sh: start-to-READY of the stock guest under vmm-min and under QEMU
# (-M microvm,rtc=on -accel kvm), same kernel, initramfs, memory, command line, in the same
# tier: the KVM lab (real KVM, nested under TCG). Prints a side-by-side table.
#
#   bench/boot/run.sh [RUNS]        (default 3 runs each)
#
# On the host it re-runs itself inside scripts/kvm-lab.sh; inside the lab (KVM_LAB=1) it measures.
# A disk behind qemu-storage-daemon (vhost-user-blk) is attached to both, so both boots include
# probing a vhost-user disk.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RUNS="${1:-3}"
if [ "${KVM_LAB:-}" != 1 ]; then
    cargo build --quiet -p vmm-min --manifest-path "$ROOT/Cargo.toml"
    exec "$ROOT/scripts/kvm-lab.sh" -t 1800 -- "$HERE/run.sh" "$RUNS"
fi
GUEST="${COLO_CACHE:-$ROOT/.cache}/guest"
VMM="$ROOT/target/debug/vmm-min"
W="$(mktemp -d /tmp/bench-boot.XXXX)"
CMDLINE="console=ttyS0 quiet pci=noearly colo.services=http,echo"
truncate -s 16M "$W/disk.img"
qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$W/disk.img" \
    --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$W/blk.sock,writable=on" &
QSD=$!
trap 'kill $QSD 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$W/blk.sock" ] && break; sleep 0.1; done

# time_to_ready NAME CMD...: runs CMD (serial to $W/con.log), prints seconds until READY.
time_to_ready() {
    local log="$W/con.log"; : > "$log"
    local t0; t0=$(date +%s.%N)
    "$@" > /dev/null 2> "$W/err.log" &
    local pid=$!
    local t=""
    for _ in $(seq 6000); do
        if grep -q COLO-GUEST-READY "$log" 2>/dev/null; then t=$(echo "$(date +%s.%N) - $t0" | bc); break; fi
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    echo "${t:-FAIL}"
}

declare -a V Q
for i in $(seq "$RUNS"); do
    V+=("$(time_to_ready "$VMM" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" \
        --cmdline "$CMDLINE" --memory 256M --serial "file:$W/con.log" \
        --disk "vhost-user,socket=$W/blk.sock")")
    Q+=("$(time_to_ready qemu-system-x86_64 -M microvm,rtc=on,memory-backend=mem -accel kvm -m 256M \
        -object memory-backend-memfd,id=mem,size=256M,share=on -nodefaults -no-user-config \
        -global virtio-mmio.force-legacy=false -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
        -append "$CMDLINE" -serial "file:$W/con.log" -display none \
        -chardev "socket,id=c0,path=$W/blk.sock" -device vhost-user-blk,chardev=c0)")
done
echo "Boot to COLO-GUEST-READY, seconds, KVM lab (nested KVM under TCG), 256 MiB, 1 vCPU, vhost-user-blk disk"
printf '%-6s %-12s %-12s\n' run vmm-min qemu-microvm
for i in $(seq 0 $((RUNS - 1))); do printf '%-6s %-12s %-12s\n' "$((i + 1))" "${V[$i]}" "${Q[$i]}"; done
