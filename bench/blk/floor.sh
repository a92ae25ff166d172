#!/bin/sh
# The floor of the replication design on this host (#6's "within 1.5x of local-only latency
# on loopback"): bench/blk/floor.c models a 4 KiB QD1 write with the same threads and waits as
# vhost-blk-colo (frontend, primary, secondary over loopback TCP), in C, nothing of ours in
# the way, and prints per-pair p50s and ratios as blk_bench does.
#   bench/blk/floor.sh [PAIRS]   (default 16; SSPIN / PSPIN in the environment set the
#                                 secondary's and the primary's poll in µs, default 150 / 50)
# Images as blk_bench makes them: one 128 MiB file written in one go, the secondary's a copy.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
pairs=${1:-16}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT INT TERM
cc -O2 -pthread -o "$dir/floor" "$root/bench/blk/floor.c"
python3 -c "open('$dir/primary.img', 'wb').write(b'\x11' * (128 << 20))"
cp "$dir/primary.img" "$dir/secondary.img"
sync
"$dir/floor" "$dir/primary.img" "$dir/secondary.img" "$pairs"
