#!/bin/sh
# Two builds of vhost-blk-colo's replication secondary side by side: what one costs per
# replicated 4 KiB QD1 write against the other, without the primary, the local write or
# vhost-user in the way (#6's latency: a change on the secondary's path shows undiluted here,
# where blk_bench's ratio swings with the host's page cache and CPU speed).
#   bench/blk/secondary_ab.sh BIN_A BIN_B [PAIRS]
#     BIN_A, BIN_B: vhost-blk-colo binaries, each set up as the seed's secondary (nbd-server-start,
#       nbd-server-add, colo-blk-start) on its own copy of one 128 MiB image made as blk_bench
#       makes it; "model" is bench/blk/model_secondary.c, the design's floor (poll, read, pwrite,
#       reply, in C)
#     PAIRS: pairs of 0.25 s segments, alternating ABBA (default 24)
#   PSPIN in the environment: the client's reply poll in µs (default 50, as the primary's).
# bench/blk/nbd_rtt.c is the client; it prints each pair's p50 round trips and B - A.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ $# -lt 2 ]; then
    sed -n 2,14p "$0" >&2
    exit 2
fi
bin_a=$1 bin_b=$2
[ "$bin_a" = model ] || bin_a=$(realpath "$bin_a")
[ "$bin_b" = model ] || bin_b=$(realpath "$bin_b")
pairs=${3:-24}
dir=$(mktemp -d)
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
cc -O2 -o "$dir/nbd_rtt" "$root/bench/blk/nbd_rtt.c"
# Both images made alike (how a file was written decides its page-cache folios, and so the
# cost of a 4 KiB write into it: bench/blk/floor.sh).
python3 -c "open('$dir/source.img', 'wb').write(b'\x11' * (128 << 20))"
cp "$dir/source.img" "$dir/a.img"
cp "$dir/source.img" "$dir/b.img"
rm "$dir/source.img"
sync
. "$root/bench/blk/secondary.sh"
start_secondary "$bin_a" "$dir" a
pids="$secondary_pid"
port_a=$port
start_secondary "$bin_b" "$dir" b
pids="$pids $secondary_pid"
"$dir/nbd_rtt" "$port_a" "$port" $((128 << 20)) "$pairs"
