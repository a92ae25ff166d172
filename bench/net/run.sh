#!/bin/sh
# Frames/s and latency through vhost-net-colo, driven by its test frontend straight from shared
# memory (no guest), with and without the primary's COLO chain. Prints a markdown table.
#   bench/net/run.sh [--frames N]
# Not done here (see BENCHMARKS.md): guest TCP throughput against QEMU's own virtio-net.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p vhost-net-colo --bin vhost-net-colo --example netbench
exec "$root/target/release/examples/netbench" --bin "$root/target/release/vhost-net-colo" "$@"
