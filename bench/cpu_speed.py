#!/usr/bin/env python3
"""How steady this machine's CPU speed is: times the same fixed loop every 0.5 s.

    bench/cpu_speed.py [SECONDS]     (default 30)

Prints each sample (ms of thread CPU time and of wall time for the loop) and then the minimum,
median and maximum. On a steady machine the samples agree within a few percent; where they do
not, benchmarks of CPU-bound work (a TCG guest, a busy backend) must interleave what they
compare (bench/net/ab.sh) instead of measuring one side after the other.
"""
import statistics
import sys
import time


def sample():
    c0, t0 = time.thread_time(), time.perf_counter()
    x = 0
    for i in range(300_000):
        x += i * i
    return (time.thread_time() - c0) * 1e3, (time.perf_counter() - t0) * 1e3


def main():
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    end = time.monotonic() + secs
    cpu = []
    while time.monotonic() < end:
        c, w = sample()
        cpu.append(c)
        print(f"{time.strftime('%H:%M:%S')} loop {c:6.2f} ms CPU, {w:6.2f} ms wall", flush=True)
        time.sleep(0.5)
    print(f"{len(cpu)} samples: min {min(cpu):.2f}, median {statistics.median(cpu):.2f}, "
          f"max {max(cpu):.2f} ms CPU (max / min {max(cpu) / min(cpu):.2f})")


if __name__ == "__main__":
    main()
