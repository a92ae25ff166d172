#!/bin/sh
# Block benchmark: vhost-blk-colo vs qemu-storage-daemon (vhost-user-blk export) on the same file,
# driven by the same test frontend (memfd shared memory, no guest), and the cost of replication
# (primary + NBD secondary on loopback vs local only). Prints a markdown table.
#   bench/blk/run.sh [--seconds N] [--size-mib M] [--repeat R] [--workers W] [--num-queues Q] [--only WORKLOAD] [--no-qsd] [--no-replication] [--direct]
#   (--targets LABEL,..: run only the backends whose label contains one of these, e.g. to profile)
# Every backend is started first; each workload then runs on each backend in turn (order
# alternating between repetitions); with --repeat the median run is shown with all runs.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p vhost-blk-colo --bin vhost-blk-colo --example blk_bench
exec "$root/target/release/examples/blk_bench" --ours "$root/target/release/vhost-blk-colo" "$@"
