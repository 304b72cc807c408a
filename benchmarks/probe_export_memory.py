"""RSS of a command (and its child processes) over time, for NOTES.md § Export memory.

    python benchmarks/probe_export_memory.py .venv/bin/sdrt -v export --model /tmp/bench/sd15 --out /tmp/e

Prints the command's log lines with the RSS at that moment, then the peak and the largest RSS in each
10-second window (which phase of a component's export holds the memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def tree_rss_gib(pid: int) -> float:
    """Resident memory of ``pid`` and its direct children, GiB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            if int(entry) != pid and parent != pid:
                continue
            with open(f"/proc/{entry}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 2**20


def main() -> None:
    start = time.time()
    proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True, bufsize=1)
    samples: list[tuple[float, float]] = [(0.0, 0.0)]

    def sample() -> None:
        while proc.poll() is None:
            samples.append((time.time() - start, tree_rss_gib(proc.pid)))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stderr:
        if "INFO" in line or "rror" in line:
            print(f"{time.time() - start:7.1f} s  rss {samples[-1][1]:5.1f} GiB | {line.strip()[-150:]}", flush=True)
    proc.wait()
    print(f"peak {max(r for _, r in samples):.2f} GiB (exit {proc.returncode})")
    for t0 in range(0, int(samples[-1][0]) + 10, 10):
        window = [r for t, r in samples if t0 <= t < t0 + 10]
        if window:
            print(f"{t0:5d} s  max {max(window):5.1f} GiB")


if __name__ == "__main__":
    main()
