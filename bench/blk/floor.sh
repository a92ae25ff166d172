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
#   (default 150 / 50).
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
python3 -c "open('$dir/primary.img', 'wb').write(b'\x11' * (128 << 20))"
cp "$dir/primary.img" "$dir/secondary.img"
sync
if [ -n "$ours" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$ours" --qmp "unix:$dir/secondary.qmp" \
        --drive "if=none,id=colo-disk0,driver=raw,file.filename=$dir/secondary.img" \
        --drive "id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0" \
        >/dev/null 2>&1 &
    secondary_pid=$!
    # The seed's secondary steps over QMP: nbd-server-start, nbd-server-add, then replication.
    python3 - "$dir/secondary.qmp" "$port" <<'EOF'
import json, os, socket, sys, time
path, port = sys.argv[1], sys.argv[2]
deadline = time.time() + 30
while not os.path.exists(path):
    if time.time() > deadline:
        sys.exit("the secondary's QMP socket did not appear")
    time.sleep(0.05)
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
qmp = sock.makefile("rw")
qmp.readline()  # greeting
def execute(cmd, args=None):
    qmp.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n")
    qmp.flush()
    while True:
        msg = json.loads(qmp.readline())
        if "error" in msg:
            sys.exit(f"{cmd}: {msg['error']}")
        if "return" in msg:
            return
execute("qmp_capabilities")
execute("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port}}})
execute("nbd-server-add", {"device": "colo-disk0", "writable": True})
execute("colo-blk-start")
EOF
    NBD_PORT=$port "$dir/floor" "$dir/primary.img" "$dir/secondary.img" "$pairs"
else
    "$dir/floor" "$dir/primary.img" "$dir/secondary.img" "$pairs"
fi
