#!/bin/sh
# Frames/s and latency through vhost-net-colo, driven by its test frontend straight from shared
# memory (no guest), with and without the primary's COLO chain. Prints a markdown table.
#   bench/net/run.sh [--frames N]
# Guest TCP throughput and latency against QEMU's own virtio-net: bench/net/guest.sh (TCG) and
# bench/net/lab.sh (KVM lab).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p vhost-net-colo --bin vhost-net-colo --example netbench
exec "$root/target/release/examples/netbench" --bin "$root/target/release/vhost-net-colo" "$@"
