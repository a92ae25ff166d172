#!/bin/sh
# Benchmark our comparer against QEMU 7.2's colo-compare: same frames, same Unix sockets,
# same run; prints a side-by-side table. Arguments go to the benchmark program
# (--quick for a short run, --impl ours|qemu|both, --rate N for the latency run).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p comparer --bin comparer && cargo build --release -q -p bench-comparer
exec "$root/target/release/bench-comparer" --comparer "$root/target/release/comparer" "$@"
