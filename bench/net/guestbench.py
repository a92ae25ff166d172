#!/usr/bin/env python3
"""Client side of bench/net/guest.sh (stdlib only; runs on the host or inside a namespace).

  guestbench.py wait  HOST ECHO_PORT DEADLINE_S      wait until the guest's echo answers
  guestbench.py measure HOST ECHO_PORT HTTP_PORT --bulk-mib N --rtt N --http N
      prints one JSON line: bulk echo throughput (MiB/s, each direction at once), echo round
      trips (64-byte lines on one connection, TCP_NODELAY) and HTTP GET / (a new connection
      each, HTTP/1.0) p50/p99
  guestbench.py qmp SOCKET CMD_JSON...               runs QMP commands (one JSON object each:
      {"execute": ..., "arguments": ...}); fails on the first error
  guestbench.py relay SRC_UNIX DST_UNIX               copies the byte stream of one Unix socket
      to another (a comparer that releases everything at once); reading never waits for writing
      (unbounded buffer), as a comparer queues: a relay that blocks on its write side while
      the other end blocks writing to it deadlocks QEMU, whose chardev writes block
  guestbench.py sink SRC_UNIX                         reads a Unix socket and discards it
  guestbench.py bulk HOST PORT MIB                    prints the MiB/s of one bulk echo
  guestbench.py get HOST PORT PATH                    prints the body of an HTTP GET (guest counters)
  guestbench.py cpusnap PID...                        JSON: CPU ticks of every thread of PIDs
      ("all": every process on the host, kernel threads included, and /proc/stat per CPU)
  guestbench.py cpudiff BEFORE AFTER MIB              CPU ms (per MiB) of each process and
      thread between two snapshots, busiest first
"""

import json
import socket
import sys
import threading
import time

IO_TIMEOUT = 60.0


def die(msg):
    print(f"guestbench: {msg}", file=sys.stderr)
    sys.exit(1)


def wait_echo(host, port, deadline_s):
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(b"x")
                if s.recv(1) == b"x":
                    return
        except OSError as e:
            last = e
        time.sleep(0.5)
    die(f"echo at {host}:{port} did not answer within {deadline_s} s ({last})")


def pct(vals, p):
    v = sorted(vals)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def bulk(host, port, mib):
    total = mib << 20
    chunk = bytes(range(256)) * 256  # 64 KiB
    s = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    s.settimeout(IO_TIMEOUT)
    got = [0]
    err = []

    # One receive buffer for the whole run (recv(n) allocates n bytes per call: at 1 MiB that
    # is an mmap and page faults each time, CPU the guest's cores would otherwise have).
    rbuf = bytearray(1 << 20)

    def reader():
        try:
            while got[0] < total:
                n = s.recv_into(rbuf)
                if not n:
                    break
                got[0] += n
        except OSError as e:
            err.append(e)

    t0 = time.perf_counter()
    t = threading.Thread(target=reader)
    t.start()
    sent = 0
    view = memoryview(chunk)
    try:
        while sent < total:
            n = min(len(chunk), total - sent)
            s.sendall(view[:n])
            sent += n
    except OSError as e:
        err.append(e)
    t.join(IO_TIMEOUT * 4)
    dt = time.perf_counter() - t0
    s.close()
    if err or got[0] != total:
        die(f"bulk echo: {got[0]} of {total} bytes back ({err})")
    return mib / dt


BUDGET_S = 60.0  # per part (round trips, HTTP): stop early, report how many were done


def rtt(host, port, n):
    s = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    s.settimeout(IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = b"x" * 63 + b"\n"
    out = []
    end = time.monotonic() + BUDGET_S
    for i in range(n + 5):
        if time.monotonic() > end:
            break
        t0 = time.perf_counter()
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            b = s.recv(len(line) - len(got))
            if not b:
                die("echo closed during round trips")
            got += b
        if got != line:
            die("echo returned other bytes")
        if i >= 5:  # warm-up
            out.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return out


def http(host, port, n):
    out = []
    end = time.monotonic() + BUDGET_S
    for _ in range(n):
        if time.monotonic() > end:
            break
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as s:
            s.settimeout(IO_TIMEOUT)
            s.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
            body = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                body += b
        if b"colo guest" not in body:
            die(f"HTTP answer without the page: {body[:200]!r}")
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def get(host, port, path):
    """Print the body of GET path (HTTP/1.0) from the guest."""
    with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT) as s:
        s.settimeout(IO_TIMEOUT)
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    sys.stdout.write(data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace"))


def measure(argv):
    host, echo, httpp = argv[0], int(argv[1]), int(argv[2])
    opts = dict(zip(argv[3::2], argv[4::2]))
    mib = int(opts.get("--bulk-mib", "8"))
    nr = int(opts.get("--rtt", "200"))
    nh = int(opts.get("--http", "30"))
    r = rtt(host, echo, nr)
    h = http(host, httpp, nh)
    b = bulk(host, echo, mib)
    if not r or not h:
        die(f"no round trip or HTTP answer within {BUDGET_S} s")
    print(json.dumps({
        "bulk_mibs": round(b, 2), "rtt_n": len(r), "http_n": len(h),
        "rtt_p50_us": round(pct(r, 50)), "rtt_p99_us": round(pct(r, 99)),
        "http_p50_ms": round(pct(h, 50), 2), "http_p99_ms": round(pct(h, 99), 2),
    }))


def qmp(argv):
    path = argv[0]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    f = s.makefile("rwb")

    def reply():
        while True:
            line = f.readline()
            if not line:
                die("QMP closed")
            m = json.loads(line)
            if "event" not in m:
                return m

    reply()  # greeting
    for cmd in [{"execute": "qmp_capabilities"}] + [json.loads(a) for a in argv[1:]]:
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        m = reply()
        if "error" in m:
            die(f"QMP {cmd}: {m['error']}")
        if m.get("return") and __import__("os").environ.get("QMP_PRINT"):
            print(json.dumps(m["return"]))
    s.close()


def relay(src, dst):
    import queue
    a = socket.socket(socket.AF_UNIX)
    a.connect(src)
    b = socket.socket(socket.AF_UNIX)
    b.connect(dst)
    q = queue.SimpleQueue()

    def writer():
        while True:
            d = q.get()
            if d is None:
                return
            b.sendall(d)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    # Read into one buffer and queue a copy of what came (see bulk: no 1 MiB allocation per
    # read).
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = a.recv_into(buf)
        if not n:
            break
        q.put(bytes(view[:n]))
    q.put(None)
    t.join()


def sink(src):
    a = socket.socket(socket.AF_UNIX)
    a.connect(src)
    buf = bytearray(1 << 20)
    while a.recv_into(buf):
        pass


def cpusnap(pids):
    import os
    out = {}
    if pids == ["all"]:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        for ln in open("/proc/stat"):
            if ln.startswith("cpu"):
                f = ln.split()
                # user nice system idle iowait irq softirq steal
                out["stat/" + f[0]] = [int(v) for v in f[1:9]]
    for pid in pids:
        try:
            exe = open(f"/proc/{pid}/comm").read().strip()
            tids = __import__("os").listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                st = open(f"/proc/{pid}/task/{tid}/stat").read()
                vs = open(f"/proc/{pid}/task/{tid}/status").read()
            except OSError:
                continue
            comm = st[st.index("(") + 1:st.rindex(")")]
            f = st[st.rindex(")") + 2:].split()
            sw = {k: int(v) for k, v in (ln.split(":\t") for ln in vs.splitlines()
                                         if ln.endswith(tuple("0123456789")) and "ctxt" in ln)}
            out[f"{pid}/{tid}"] = {"proc": exe, "thread": comm, "ticks": int(f[11]) + int(f[12]),
                                   "vcs": sw.get("voluntary_ctxt_switches", 0),
                                   "ivcs": sw.get("nonvoluntary_ctxt_switches", 0)}
    print(json.dumps(out))


def cpudiff(a, b, mib):
    import os
    hz = os.sysconf("SC_CLK_TCK")
    x, y, mib = json.load(open(a)), json.load(open(b)), float(mib)
    rows, procs = [], {}
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    for k in sorted(k for k in y if k.startswith("stat/")):
        d = [(v - u) * 1000.0 / hz for u, v in zip(x.get(k, [0] * 8), y[k])]
        print(f"{k[5:]:6} ms: " + " ".join(f"{n} {v:.0f}" for n, v in zip(names, d)))
    for k, v in y.items():
        if k.startswith("stat/"):
            continue
        u = x.get(k, {"ticks": 0, "vcs": 0, "ivcs": 0})
        ms = (v["ticks"] - u["ticks"]) * 1000.0 / hz
        vcs, ivcs = v["vcs"] - u["vcs"], v["ivcs"] - u["ivcs"]
        rows.append((ms, v["proc"], k, v["thread"], vcs, ivcs))
        p = procs.setdefault(v["proc"], [0.0, 0, 0])
        p[0] += ms
        p[1] += vcs
        p[2] += ivcs
    print(f"process: CPU ms, ms/MiB, voluntary/involuntary switches per MiB ({mib:g} MiB each way)")
    for name, (ms, vcs, ivcs) in sorted(procs.items(), key=lambda p: -p[1][0]):
        if not ms and vcs < mib:
            continue
        print(f"  {name:20} {ms:8.0f} {ms / mib:7.2f} {vcs / mib:8.1f} {ivcs / mib:8.1f}")
    print("thread:")
    for ms, proc, k, th, vcs, ivcs in sorted(rows, reverse=True):
        if ms or vcs:
            print(f"  {proc:16} {k:14} {th:18} {ms:8.0f} {ms / mib:7.2f} {vcs / mib:8.1f} {ivcs / mib:8.1f}")


def main():
    if len(sys.argv) < 2:
        die(__doc__)
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "wait":
        wait_echo(argv[0], int(argv[1]), float(argv[2]))
    elif cmd == "measure":
        measure(argv)
    elif cmd == "qmp":
        qmp(argv)
    elif cmd == "relay":
        relay(argv[0], argv[1])
    elif cmd == "sink":
        sink(argv[0])
    elif cmd == "bulk":
        print(f"{bulk(argv[0], int(argv[1]), int(argv[2])):.2f}")
    elif cmd == "get":
        get(argv[0], argv[1], argv[2])
    elif cmd == "cpusnap":
        cpusnap(argv)
    elif cmd == "cpudiff":
        cpudiff(argv[0], argv[1], argv[2])
    else:
        die(__doc__)


if __name__ == "__main__":
    main()
