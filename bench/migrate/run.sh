#!/bin/bash
# bench/migrate/run.sh: live-migration total time and downtime of the stock guest, vmm-min vs
# QEMU 7.2 (-M microvm,rtc=on -accel kvm), same kernel, initramfs, RAM (256 MiB), 1 vCPU,
# command line and migration parameters, in the same KVM lab run (real KVM nested under TCG):
# an idle guest and a guest dirtying memory (its dirtier service, DIRTY <pps> <pages>). Also
# prints the memcpy speed inside L1 and, per run, the time to copy the final dirty set at that
# speed (the target: downtime within 2x of it). Prints one side-by-side table.
#
#   bench/migrate/run.sh [RUNS]        (default 1 run of each VMM x scenario)
#
# Knobs (environment): MIGRATE_MEM_MIB (256), MIGRATE_DOWNTIME_MS (300), MIGRATE_BANDWIDTH
# (bytes/s, default 10 GiB/s = unlimited), MIGRATE_DIRTY_PPS (2000), MIGRATE_DIRTY_PAGES (8192),
# MIGRATE_VMMS (vmm-min,qemu), MIGRATE_PROFILE (release: vmm-min and vhost-net-colo are built
# with --release, as QEMU is optimised C; debug uses target/debug).
#
# On the host it builds the binaries and re-runs itself inside scripts/kvm-lab.sh; inside the lab
# (KVM_LAB=1) it runs bench.py. Needs python3, qemu-system-x86, and the guest of
# scripts/build-guest.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RUNS="${1:-1}"
if [ "${KVM_LAB:-}" != 1 ]; then
    "$ROOT/scripts/build-guest.sh" >/dev/null
    if [ "${MIGRATE_PROFILE:-release}" = release ]; then
        cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" -p vmm-min -p vhost-net-colo
    else
        cargo build --quiet --manifest-path "$ROOT/Cargo.toml" -p vmm-min -p vhost-net-colo
    fi
    # One lab at a time: the same lock as the lab tests (colo_tests::lab).
    LOCK="${KVM_LAB_DIR:-$ROOT/.cache/kvm-lab}/run.lock"
    mkdir -p "$(dirname "$LOCK")"
    exec flock "$LOCK" "$ROOT/scripts/kvm-lab.sh" -t "${MIGRATE_LAB_TIMEOUT:-2400}" -- "$HERE/run.sh" "$RUNS"
fi
exec python3 "$HERE/bench.py" "$RUNS"
