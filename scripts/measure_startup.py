"""What the start-up hook adds to every Python process: median over runs of ``python -c pass``.

Reads ``-X importtime`` for ``clip_benchmark_diffusion._startup`` (cumulative, it includes the
package ``__init__``) and also times ``python -c pass`` end to end for context.

    python scripts/measure_startup.py --runs 30
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    hook_us, wall_ms = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
        wall_ms.append((time.perf_counter() - t0) * 1000)
        for line in proc.stderr.splitlines():
            if line.rstrip().endswith("clip_benchmark_diffusion._startup"):
                hook_us.append(int(line.split("|")[1]))
    if not hook_us:
        sys.exit("the start-up hook did not run: is the package installed (pip install -e .)?")
    print(f"start-up hook (import of clip_benchmark_diffusion._startup, cumulative): "
          f"median {statistics.median(hook_us) / 1000:.2f} ms, max {max(hook_us) / 1000:.2f} ms over {len(hook_us)} runs")
    print(f"python -X importtime -c pass, whole process: median {statistics.median(wall_ms):.1f} ms")


if __name__ == "__main__":
    main()
