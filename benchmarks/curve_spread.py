"""Does `fast` stay the same run: the logged losses of loop-fast against the default path's own seed-to-seed spread.

    python benchmarks/curve_spread.py OUTDIR WORKLOAD

reads OUTDIR/curves-WORKLOAD-{loop,loop-fast}-{42,43}/bench.json (as `bash benchmarks/gpu_speed.sh curves` writes
them) and prints, over the logged steps: the default path's seed-to-seed difference (its run-to-run spread), the fast
path's, fast against default at each seed, each run's mean loss over the last 30% of the steps, and each side's peak
memory. "Within the spread" means at each logged step past the first 50, fast's difference from the default run of
the same seed is no larger than the default path's difference between its two seeds at that step, or the whole
window's mean losses differ by less than the two default seeds' means do.
"""

from __future__ import annotations

import json
import os
import sys


def curve(out, workload, side, seed):
    with open(os.path.join(out, f"curves-{workload}-{side}-{seed}", "bench.json")) as f:
        row = json.load(f)["sides"][0]
    return dict(map(tuple, row["curve"])), row["peak_memory_gb"], row["ms_per_step"]


def rel(a, b, steps):
    return {s: abs(a[s] - b[s]) / abs(a[s]) for s in steps}


def main(out, workload):
    runs = {(side, seed): curve(out, workload, side, seed) for side in ("loop", "loop-fast") for seed in (42, 43)}
    steps = sorted(set.intersection(*(set(c) for c, _, _ in runs.values())))
    last = [s for s in steps if s > 0.7 * steps[-1]]
    late = [s for s in steps if s > 50]
    d, f = (
        {k[1]: v[0] for k, v in runs.items() if k[0] == "loop"},
        {k[1]: v[0] for k, v in runs.items() if k[0] != "loop"},
    )
    spread = rel(d[42], d[43], steps)
    mean = {k: sum(c[s] for s in last) / len(last) for k, (c, _, _) in runs.items()}
    print(f"{workload}: {len(steps)} logged steps to step {steps[-1]}; mean loss over steps {last[0]}-{last[-1]}:")
    for (side, seed), m in mean.items():
        _, peak, ms = runs[side, seed]
        peak = "-" if peak is None else f"{peak:.2f}"
        print(f"  {side:9} seed {seed}: {m:.4f}  (peak {peak} GB, {ms:.1f} ms/step on a shared device)")
    print(
        f"  max rel diff past step 50: default 42 vs 43 {max(spread[s] for s in late):.2%}, fast 42 vs 43 "
        f"{max(rel(f[42], f[43], late).values()):.2%}"
    )
    ok = True
    for seed in (42, 43):
        fd = rel(d[seed], f[seed], steps)
        over = [s for s in late if fd[s] > spread[s]]
        window = abs(mean["loop-fast", seed] - mean["loop", seed]) <= abs(mean["loop", 42] - mean["loop", 43])
        print(
            f"  fast vs default, seed {seed}: max rel diff past step 50 {max(fd[s] for s in late):.2%} (all steps "
            f"{max(fd.values()):.2%}); {len(over)} of {len(late)} logged steps past 50 beyond the default's seed "
            f"spread at that step; last-window mean diff {abs(mean['loop-fast', seed] - mean['loop', seed]):.4f} "
            f"against the default seeds' {abs(mean['loop', 42] - mean['loop', 43]):.4f}"
        )
        ok = ok and (len(over) <= len(late) // 2 or window)
    print(f"{workload}: fast {'stays within' if ok else 'LEAVES'} the default path's seed-to-seed spread")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
