#!/bin/bash
# bench/net/guest.sh in the KVM tier, inside the KVM lab (scripts/kvm-lab.sh): vmm-min as the
# frontend of vhost-net-colo against QEMU 7.2 -accel kvm -M microvm with its own virtio-net on a
# tap (vhost=off). Builds both release binaries on the host first; arguments go to guest.sh.
#   bench/net/lab.sh [--configs "ours-user ours-tap qemu-tap"] [--bulk-mib N] ...
# --vmm BIN runs that vmm-min binary instead of target/release's (e.g. a saved older build, for
# an A/B in one lab run: the host's file system is visible in the lab). PROFILE_DIR=DIR (shared
# read-write with the lab) and PROFILE_PERF=kvm: per measurement, KVM exits by reason, MSR and
# MMIO exits, interrupts, from L1's KVM, for both VMMs (bench/net/kvmprof.sh).
# AB_VMMS="OLD_BIN NEW_BIN" [AB_ROUNDS=2]: an A/B of vmm-min binaries in one lab boot (guest.sh
# per binary, alternated; the host is quieter between them than between two lab runs).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
nice cargo build --release -q -p vhost-net-colo --bin vhost-net-colo
nice cargo build --release -q -p vmm-min --bin vmm-min
"$root/scripts/build-guest.sh" >/dev/null
# One lab run at a time, like the tests (colo_tests::lab takes the same lock).
lock="${KVM_LAB_DIR:-$root/.cache/kvm-lab}/run.lock"
mkdir -p "$(dirname "$lock")"
share=()
if [ -n "${PROFILE_DIR:-}" ]; then
    mkdir -p "$PROFILE_DIR"
    PROFILE_DIR=$(cd "$PROFILE_DIR" && pwd)
    export PROFILE_DIR
    share=(-w "$PROFILE_DIR")
fi
if [ -n "${AB_VMMS:-}" ]; then
    # A/B in one lab boot: guest.sh once per vmm-min binary of AB_VMMS, alternated, AB_ROUNDS
    # times (default 2), each table headed by the binary.
    exec flock "$lock" "$root/scripts/kvm-lab.sh" "${share[@]}" -t "${NETBENCH_LAB_TIMEOUT:-1500}" -- \
        bash -c 'set -u; g=$1; shift
            for r in $(seq "${AB_ROUNDS:-2}"); do
                for v in $AB_VMMS; do
                    echo "== A/B round $r: vmm-min $v"
                    if [ -n "${PROFILE_DIR:-}" ]; then
                        export PROFILE_DIR="${P0:=$PROFILE_DIR}/r$r-${v##*/}"
                    fi
                    "$g" --tier kvm --no-build --vmm "$v" "$@" || echo "guest.sh failed: $?"
                done
            done' _ "$root/bench/net/guest.sh" "$@"
fi
exec flock "$lock" "$root/scripts/kvm-lab.sh" "${share[@]}" -t "${NETBENCH_LAB_TIMEOUT:-1500}" -- \
    "$root/bench/net/guest.sh" --tier kvm --no-build "$@"
