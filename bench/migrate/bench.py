#!/usr/bin/env python3
"""Live-migration benchmark, run inside the KVM lab by bench/migrate/run.sh.

For each VMM (vmm-min, QEMU 7.2 -accel kvm) and each scenario (idle guest; guest dirtying memory
with its dirtier service, DIRTY <pps> <pages>), boots the stock guest (same kernel, initramfs,
RAM, vCPUs, command line), migrates it over TCP on 127.0.0.1 to a second process of the same
VMM with the same migration parameters, and records query-migrate's figures. Also measures this
machine's memcpy speed and, per run, the time to copy the final dirty set at that speed (the
issue's target: downtime within 2x of it). Prints one side-by-side table.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GUEST = os.path.join(os.environ.get("COLO_CACHE", os.path.join(ROOT, ".cache")), "guest")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
PROFILE = os.environ.get("MIGRATE_PROFILE", "release")  # QEMU is optimised C: compare like with like
VMM = os.path.join(TARGET, PROFILE, "vmm-min")
NET = os.path.join(TARGET, PROFILE, "vhost-net-colo")
MEM_MIB = int(os.environ.get("MIGRATE_MEM_MIB", "256"))
DOWNTIME_MS = int(os.environ.get("MIGRATE_DOWNTIME_MS", "300"))
BANDWIDTH = int(os.environ.get("MIGRATE_BANDWIDTH", str(10 << 30)))  # bytes/s, i.e. unlimited
DIRTY_PPS = int(os.environ.get("MIGRATE_DIRTY_PPS", "2000"))
DIRTY_PAGES = int(os.environ.get("MIGRATE_DIRTY_PAGES", "8192"))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
VMMS = os.environ.get("MIGRATE_VMMS", "vmm-min,qemu").split(",")
CMDLINE = "console=ttyS0 quiet pci=noearly colo.services=dirty,http"
W = tempfile.mkdtemp(prefix="bench-migrate.")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Qmp:
    def __init__(self, path, deadline=60):
        end = time.time() + deadline
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.1)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {name}")
            v = json.loads(line)
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise RuntimeError(f"QMP {name}: {v['error']}")
            return v.get("return")


class Proc:
    def __init__(self, name, argv, env=None):
        self.name = name
        self.out = open(os.path.join(W, name + ".log"), "w")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                  env=env)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.out.close()

    def text(self):
        with open(os.path.join(W, self.name + ".log"), errors="replace") as f:
            return f.read()


def wait_file(path, marker, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path, errors="replace") as f:
                if marker in f.read():
                    return
        except FileNotFoundError:
            pass
        if proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{marker!r} not in {path} after {timeout} s")


def start(kind, role, tag, fwd_port=None, incoming=None):
    """Starts one VMM (and for vmm-min its vhost-net-colo). Returns (procs, qmp path, serial)."""
    serial = os.path.join(W, f"{tag}-{role}.serial")
    qmp = os.path.join(W, f"{tag}-{role}.qmp")
    netdev = "user,id=n0" + (f",hostfwd=tcp:127.0.0.1:{fwd_port}-:5001" if fwd_port else "")
    procs = []
    if kind == "vmm-min":
        sock = os.path.join(W, f"{tag}-{role}-net.sock")
        net = Proc(f"{tag}-{role}-net", [NET, "--socket", sock, "--netdev", netdev, "--mac", "52:54:00:12:34:56"])
        procs.append(net)
        end = time.time() + 60
        while not os.path.exists(sock):
            if time.time() > end:
                raise RuntimeError("vhost-net-colo did not listen")
            time.sleep(0.05)
        argv = [VMM, "--memory", f"{MEM_MIB}M", "--serial", f"file:{serial}", "--qmp", f"unix:{qmp}",
                "--net", f"vhost-user,socket={sock},mac=52:54:00:12:34:56"]
        if incoming:
            argv += ["--incoming", incoming]
        else:
            argv += ["--kernel", f"{GUEST}/vmlinuz", "--initrd", f"{GUEST}/initramfs.cpio.gz", "--cmdline", CMDLINE]
    else:
        argv = ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-accel", "kvm", "-m", f"{MEM_MIB}M", "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.cpio.gz", "-append", CMDLINE,
                "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off",
                "-netdev", netdev, "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"]
        if incoming:
            argv += ["-incoming", incoming]
    env = None
    if kind == "vmm-min":
        # The vhost-user ring restart timings (info) on stderr, for the downtime breakdown.
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn,vmm_min::virtio::vhost_user=info"))
    procs.append(Proc(f"{tag}-{role}", argv, env))
    return procs, qmp, serial


def dirty(port, pps, pages):
    end = time.time() + 60
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"DIRTY {pps} {pages}\n".encode())
            reply = s.makefile().readline().strip()
            s.close()
            if not reply.startswith("OK DIRTY"):
                raise RuntimeError(f"dirtier: {reply!r}")
            return
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.5)


def one_run(kind, scenario, n):
    tag = f"{kind}-{scenario}-{n}"
    fwd = free_port()
    src, sq_path, src_serial = start(kind, "src", tag, fwd_port=fwd)
    procs = list(src)
    try:
        t0 = time.time()
        wait_file(src_serial, "COLO-GUEST-READY", src[-1], 600)
        log(f"{tag}: READY after {time.time() - t0:.1f} s")
        sq = Qmp(sq_path)
        if scenario == "dirty":
            dirty(fwd, DIRTY_PPS, DIRTY_PAGES)
            time.sleep(5)
        port = free_port()
        dst, dq_path, _ = start(kind, "dst", tag, incoming=f"tcp:127.0.0.1:{port}")
        procs += dst
        if kind == "vmm-min":
            wait_file(os.path.join(W, f"{tag}-dst.log"), "waiting for migration on", dst[-1], 60)
        dq = Qmp(dq_path)
        params = {"downtime-limit": DOWNTIME_MS, "max-bandwidth": BANDWIDTH}
        sq.cmd("migrate-set-parameters", params)
        t_mig = time.time()
        sq.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        last_remaining = None  # ram.remaining at the last poll while active/device
        sent_at_last_active = None  # ram.transferred at the last poll while active
        while True:
            v = sq.cmd("query-migrate")
            st = v.get("status")
            ram = v.get("ram") or {}
            if st in ("active", "device") and "remaining" in ram:
                last_remaining = ram["remaining"]
            if st == "active" and "transferred" in ram:
                sent_at_last_active = ram["transferred"]
            if st in ("completed", "failed", "cancelled"):
                break
            if time.time() - t_mig > 600:
                raise RuntimeError(f"migration not done after 600 s: {v}")
            time.sleep(0.02)
        wall = time.time() - t_mig
        if st != "completed":
            raise RuntimeError(f"migration {st}: {v}")
        # QEMU 7.2 can answer "completed" before it has filled in total-time/downtime (seen: 0
        # and 0); ask again a moment later and keep the settled figures.
        time.sleep(0.5)
        v = sq.cmd("query-migrate")
        end = time.time() + 30
        while dq.cmd("query-status").get("status") != "running":
            if time.time() > end:
                raise RuntimeError("destination not running 30 s after completion")
            time.sleep(0.05)
        ram = v.get("ram", {})
        r = {
            "vmm": kind, "scenario": scenario, "run": n, "wall_s": wall,
            "total_ms": v.get("total-time"), "downtime_ms": v.get("downtime"),
            "setup_ms": v.get("setup-time"), "transferred": ram.get("transferred"),
            "syncs": ram.get("dirty-sync-count"), "mbps": ram.get("mbps"),
            "last_remaining": last_remaining,
            "tail": (ram.get("transferred") - sent_at_last_active)
            if (sent_at_last_active is not None and ram.get("transferred") is not None) else None,
        }
        log(f"{tag}: {json.dumps(v)}")
        # The final dirty set: QEMU reports the bytes sent while stopped (ram.downtime-bytes);
        # vmm-min prints "migration downtime: pause+capture .. us, last N pages .. us, ..." on
        # the source's stderr.
        r["final_bytes"] = ram.get("downtime-bytes")
        r["breakdown"] = None
        if kind == "vmm-min":
            for line in src[-1].text().splitlines():
                m = re.search(r"last (\d+) pages", line)
                if m and "downtime" in line:
                    r["final_bytes"] = int(m.group(1)) * 4096
                    r["breakdown"] = line.strip()
                if "migration pass" in line and "expected downtime" in line:
                    r.setdefault("passes", []).append(line.strip())
            for line in dst[-1].text().splitlines():
                if "incoming switch-over" in line:
                    r["dst_breakdown"] = line.strip()
                if "incoming pass" in line:
                    r.setdefault("passes", []).append(line.strip())
                if "vhost-user rings" in line:
                    r.setdefault("passes", []).append("destination " + re.sub(r"\x1b\[[0-9;]*m", "", line.strip()))
        return r
    finally:
        for p in procs:
            p.kill()


def memcpy_speed():
    """Bytes per second of a 64 MiB memmove (Python's bytearray slice copy), best of 5."""
    n = 64 << 20
    a = bytearray(b"\x5a") * n
    b = bytearray(n)
    best = None
    for _ in range(5):
        t = time.perf_counter()
        b[:] = a
        d = time.perf_counter() - t
        best = d if best is None else min(best, d)
    return n / best


def fmt(x, scale=1.0, nd=0):
    if x is None:
        return "-"
    return f"{x / scale:.{nd}f}"


def main():
    speed = memcpy_speed()
    log(f"memcpy in L1: {speed / 1e6:.0f} MB/s")
    results = []
    for n in range(1, RUNS + 1):
        for scenario in ("idle", "dirty"):
            for kind in VMMS:
                try:
                    results.append(one_run(kind, scenario, n))
                except Exception as e:  # noqa: BLE001 - a failed run is a row, not the end
                    log(f"{kind} {scenario} {n}: FAILED: {e}")
                    results.append({"vmm": kind, "scenario": scenario, "run": n, "error": str(e)})
    print(f"Live migration, KVM lab (nested KVM under TCG), {MEM_MIB} MiB, 1 vCPU, TCP on 127.0.0.1, "
          f"downtime-limit {DOWNTIME_MS} ms, max-bandwidth {BANDWIDTH} B/s; dirty = DIRTY {DIRTY_PPS} {DIRTY_PAGES}")
    print(f"memcpy in L1 (64 MiB, best of 5): {speed / 1e6:.0f} MB/s; vmm-min: {VMM}")
    hdr = ("vmm", "scenario", "run", "total ms", "downtime ms", "sent MiB", "syncs",
           "final dirty MiB", "copy ms @memcpy", "downtime/copy")
    fmt_row = "%-8s %-8s %3s %9s %11s %9s %6s %15s %15s %13s"
    print(fmt_row % hdr)
    for r in results:
        if "error" in r:
            print("%-8s %-8s %3s FAILED: %s" % (r["vmm"], r["scenario"], r["run"], r["error"][:150]))
            continue
        fb = r["final_bytes"]
        copy_ms = fb / speed * 1000 if fb is not None else None
        ratio = (r["downtime_ms"] / copy_ms) if (copy_ms and r["downtime_ms"] is not None) else None
        print(fmt_row % (
            r["vmm"], r["scenario"], r["run"], fmt(r["total_ms"]), fmt(r["downtime_ms"]),
            fmt(r["transferred"], 1 << 20, 1), fmt(r["syncs"]), fmt(fb, 1 << 20, 2),
            fmt(copy_ms, 1, 2), fmt(ratio, 1, 1)))
    print("final dirty = pages sent while the guest was stopped (QEMU: ram.downtime-bytes; vmm-min: "
          "'last N pages' of its downtime breakdown); copy ms = that / memcpy speed. "
          "Target: downtime within 2x of that copy time.")
    for r in results:
        if r.get("breakdown"):
            print(f"{r['vmm']} {r['scenario']} {r['run']} source: {r['breakdown']}")
        if r.get("dst_breakdown"):
            print(f"{r['vmm']} {r['scenario']} {r['run']} destination: {r['dst_breakdown']}")
        for p in r.get("passes", []):
            print(f"{r['vmm']} {r['scenario']} {r['run']} {p}")


if __name__ == "__main__":
    main()
