"""How well neighbouring windows of one run resolve a speed ratio, by window length, from a recorded run.

Reads a run's ``events.jsonl`` (its ``lr`` events: one per optimizer step, timestamped by the training thread), cuts
the steady part (from ``--from-epoch``) into windows of each length, and compares every other window with the mean
of the two beside it, exactly as the churn test and bench 1b compare a window with a client (or the stream) with
the windows without one. On a run where nothing alternates, every such ratio is noise: the printed median should be
1, and its 95% interval is how precisely that method measures a cost with windows of that length in the same time.
Windows holding an epoch end are left out, as in the tests.

    python bench/window_noise.py RUN_DIR            # e.g. a run started with fts-daemon start and left alone
    python bench/window_noise.py RUN_DIR --lengths 0.05,0.1,0.2,0.4

On the 2-core VM of 2026-12-06, over a minute of the churn test's config with no client, windows of 0.04, 0.08,
0.16, 0.32 and 0.64 s deviated from their neighbours by a similar 6-9% each, so the longer the window, the fewer
the comparisons and the wider the interval (about ±1.0, 1.4, 2.0, 4.0 and 7.6%).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from daemon_bench import _median_interval as median_interval  # the same interval bench 1b prints

from fts_daemon import events as ev
from fts_daemon.history import read_events


def window_ratios(steps: list[tuple[float, int, int]], length: float) -> list[float]:
    """Rate of each odd window / the mean rate of the windows on either side, from (ts, step, epoch) per step."""
    t0, t1 = steps[0][0], steps[-1][0]
    n = int((t1 - t0) / length)
    counted, seconds, clean = [0] * n, [0.0] * n, [True] * n
    for (ta, sa, ea), (tb, sb, eb) in zip(steps, steps[1:]):
        k = int((ta - t0) / length)
        if k >= n:
            break
        if ea == eb and sb == sa + 1:
            counted[k] += 1
            seconds[k] += tb - ta
        else:  # an epoch end (validation, checkpoints) or a gap in the record
            clean[k] = False
    rates = [c / s if s > 0 and c > 1 else None for c, s in zip(counted, seconds)]
    out = []
    for i in range(1, n - 1, 2):
        here, left, right = rates[i], rates[i - 1], rates[i + 1]
        if clean[i - 1] and clean[i] and clean[i + 1] and here and left and right:
            out.append(here / ((left + right) / 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run dir or its events.jsonl")
    parser.add_argument("--lengths", default="0.04,0.08,0.16,0.32,0.64", help="window lengths in seconds")
    parser.add_argument("--from-epoch", type=int, default=2, help="the first epoch measured (default 2)")
    args = parser.parse_args()
    events, report = read_events(args.run)
    steps = [(e.ts, e.step, e.epoch) for e in events
             if e.kind == ev.LR and e.step is not None and e.epoch is not None and e.epoch >= args.from_epoch]
    if len(steps) < 100:
        print(f"{report.describe()}: fewer than 100 steps from epoch {args.from_epoch}", file=sys.stderr)
        return 1
    print(f"{report.describe()}; {len(steps)} steps over {steps[-1][0] - steps[0][0]:.0f} s from epoch "
          f"{args.from_epoch}")
    for length in (float(x) for x in args.lengths.split(",")):
        ratios = sorted(window_ratios(steps, length))
        if len(ratios) < 5:
            print(f"  {length:5.2f} s windows: too few comparisons ({len(ratios)})")
            continue
        low, high = median_interval(ratios)
        spread = statistics.median(abs(r - 1) for r in ratios)
        print(f"  {length:5.2f} s windows: {len(ratios):4d} comparisons, median {statistics.median(ratios):.3f}, "
              f"95% interval {low:.3f}-{high:.3f} (±{(high - low) / 2:.1%}); a window deviates from its "
              f"neighbours by {spread:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
