# Sourced by bench/blk/floor.sh and secondary_ab.sh: start_secondary BIN DIR NAME starts BIN
# (vhost-blk-colo) as the seed's replication secondary on DIR/NAME.img, with QMP at
# DIR/NAME.qmp, and runs the seed's QMP steps (nbd-server-start on a free loopback port,
# nbd-server-add, colo-blk-start). It sets $port (the NBD port) and $secondary_pid. $root is
# the repository.
# BIN "model": bench/blk/model_secondary.c instead, the design's floor for a secondary.
start_secondary() {
    local bin=$1 at=$2 name=$3
    if [ "$bin" = model ]; then
        cc -O2 -o "$at/model_secondary" "$root/bench/blk/model_secondary.c"
        "$at/model_secondary" "$at/$name.img" > "$at/$name.port" &
        secondary_pid=$!
        while [ ! -s "$at/$name.port" ]; do sleep 0.05; done
        port=$(cat "$at/$name.port")
        return
    fi
    # A port below the ephemeral range, which no outgoing connection takes meanwhile.
    port=$(python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(200):
    p = random.randrange(20000, max(low, 21000))
    try:
        socket.socket().bind(("127.0.0.1", p))
        print(p)
        break
    except OSError:
        pass
')
    "$bin" --qmp "unix:$at/$name.qmp" \
        --drive "if=none,id=colo-disk0,driver=raw,file.filename=$at/$name.img" \
        --drive "id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0" \
        >/dev/null 2>&1 &
    secondary_pid=$!
    # The seed's secondary steps over QMP: nbd-server-start, nbd-server-add, then replication.
    python3 - "$at/$name.qmp" "$port" <<'EOF'
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
}
