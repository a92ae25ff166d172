#!/bin/sh
# The floor of the replication design on this host (#6's "within 1.5x of local-only latency
# on loopback"): bench/blk/floor.c models a 4 KiB QD1 write with the same threads and waits as
# vhost-blk-colo (frontend, primary, secondary over loopback TCP, NBD's simple requests), in
# C, nothing of ours in the way, and prints per-pair p50s and ratios as blk_bench does.
#   bench/blk/floor.sh [--ours-secondary BIN] [PAIRS]
#     PAIRS: local-only/replicated pairs of 0.25 s segments (default 16)
#     --ours-secondary BIN: the model's primary writes to BIN (vhost-blk-colo) set up as the
#       seed's replication secondary (nbd-server-start, nbd-server-add, colo-blk-start), not to
#       the model's secondary: what our secondary adds over the model's.
#   SSPIN / PSPIN in the environment: the model secondary's and primary's polls in µs
#   (default 150 / 50). FILL_KIB: write the primary's image in pieces of that many KiB
#   (default: in one go), as blk_bench --fill-kib.
# Images as blk_bench makes them: one 128 MiB file written in one go, the secondary's a copy.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
ours=""
if [ "${1:-}" = "--ours-secondary" ]; then
    ours=$(realpath "$2")
    shift 2
fi
pairs=${1:-16}
dir=$(mktemp -d)
secondary_pid=""
cleanup() {
    if [ -n "$secondary_pid" ]; then kill "$secondary_pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
cc -O2 -pthread -o "$dir/floor" "$root/bench/blk/floor.c"
python3 -c "
import sys
f = open('$dir/primary.img', 'wb', buffering=0)
piece = ${FILL_KIB:-0} << 10 or 128 << 20
for _ in range((128 << 20) // piece):
    f.write(b'\x11' * piece)
"
cp "$dir/primary.img" "$dir/secondary.img"
sync
if [ -n "$ours" ]; then
    . "$root/bench/blk/secondary.sh"
    start_secondary "$ours" "$dir" secondary
    NBD_PORT=$port "$dir/floor" "$dir/primary.img" "$dir/secondary.img" "$pairs"
else
    "$dir/floor" "$dir/primary.img" "$dir/secondary.img" "$pairs"
fi
