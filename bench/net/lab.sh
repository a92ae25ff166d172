#!/bin/sh
# bench/net/guest.sh in the KVM tier, inside the KVM lab (scripts/kvm-lab.sh): vmm-min as the
# frontend of vhost-net-colo against QEMU 7.2 -accel kvm -M microvm with its own virtio-net on a
# tap (vhost=off). Builds both release binaries on the host first; arguments go to guest.sh.
#   bench/net/lab.sh [--configs "ours-user ours-tap qemu-tap"] [--bulk-mib N] ...
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
nice cargo build --release -q -p vhost-net-colo --bin vhost-net-colo
nice cargo build --release -q -p vmm-min --bin vmm-min
"$root/scripts/build-guest.sh" >/dev/null
# One lab run at a time, like the tests (colo_tests::lab takes the same lock).
lock="${KVM_LAB_DIR:-$root/.cache/kvm-lab}/run.lock"
mkdir -p "$(dirname "$lock")"
exec flock "$lock" "$root/scripts/kvm-lab.sh" -t "${NETBENCH_LAB_TIMEOUT:-1500}" -- \
    "$root/bench/net/guest.sh" --tier kvm --no-build "$@"
