"""How precisely a twin run cancels the host's drift: the method of the stalled-subscriber test, with nothing frozen.

Records two daemons of the stalled-subscriber test's config trained side by side, each followed by a subscriber
process that keeps reading (``--seconds`` of steady training), or reads two such recordings (``--runs A B``). Then,
for every placement of a [side, middle, side] span (sliding by 5 s), it computes what the test reports: run A's
steps/s in the middle over the mean of its sides, alone and divided by the same ratio of run B. Nothing differs
between the middle and the sides, so every ratio is noise: the deviations from 1 say how small an effect each
figure can show.

    python bench/twin_noise.py                       # record 240 s (about 5 minutes in all), then analyse
    python bench/twin_noise.py --runs RUN_A RUN_B    # run dirs (or events.jsonl) recorded side by side

On the 2-core VM of 2026-12-06, three recordings (200, 240 and 240 s) with the test's 60 s middle and 30 s sides:
alone, a middle deviated from its sides by a median 5.8%, 10.6% and 6.7% (extremes 0.83 and 1.18); against the
twin, by 0.6%, 0.8% and 0.8% (extremes 0.974 and 1.033). Shorter sides do worse against the twin (10 s: 1.0-1.6%,
extremes 0.939 and 1.061).
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fts_daemon import events as ev  # noqa: E402
from fts_daemon.history import read_events  # noqa: E402

Steps = list[tuple[float, int]]  # (ts, step) of each lr event


def record(seconds: float, directory: Path) -> tuple[Path, Path]:
    """Train two daemons of the stalled-subscriber config side by side, each followed by a subscriber, for
    ``seconds`` from phase 2 on; returns their run dirs."""
    from fts_daemon.client import Control
    from tests.daemon_support import wait_for
    from tests.reliability_support import DaemonProcess, env_for
    from tests.test_reliability_subscribers import PHASE2_STEP, stall_config

    runtime = directory / "rt"
    runtime.mkdir(mode=0o700)
    env = env_for(runtime, OMP_NUM_THREADS="1")
    cfg = stall_config(directory / "cfg")
    procs = [DaemonProcess.start(n, directory / n, env, config=cfg, extra=["--history", "10000000"]) for n in "ab"]
    subs: list[subprocess.Popen] = []
    try:
        recs = [p.record() for p in procs]
        for rec in recs:
            with Control(rec.ctl, timeout=20) as ctl:
                wait_for(lambda ctl=ctl: (ctl.request("hello")["step"] or 0) >= PHASE2_STEP, timeout=180,
                         interval=0.05)
        for i, rec in enumerate(recs):
            subs.append(subprocess.Popen([sys.executable, "-m", "tests.reliability_subscriber", rec.pub, rec.ctl,
                                          str(directory / f"sub{i}.json")], cwd=REPO, env=env))
        print(f"recording {seconds:.0f} s of two runs side by side in {directory}", flush=True)
        time.sleep(seconds)
        for rec in recs:
            with Control(rec.ctl, timeout=20) as ctl:
                ctl.request("stop")
        for p in procs:
            assert p.wait(120) == 0, p.output()[-2000:]
    finally:
        for proc in procs:
            proc.ensure_dead()
        for sub in subs:
            if sub.poll() is None:
                sub.kill()
    return directory / "a", directory / "b"


def load(run: str | Path) -> Steps:
    events, _ = read_events(run)
    # from the first step after phase 2 began (the subscriber is attached by then)
    from tests.test_reliability_subscribers import PHASE2_STEP

    return [(e.ts, e.step) for e in events if e.kind == ev.LR and e.step is not None and e.step >= PHASE2_STEP]


def rate(steps: Steps, ts: list[float], a: float, b: float) -> float:
    i, j = bisect.bisect_left(ts, a), bisect.bisect_right(ts, b) - 1
    return (steps[j][1] - steps[i][1]) / (steps[j][0] - steps[i][0])


def ratios(a: Steps, b: Steps, side: float, middle: float, stride: float = 5.0) -> tuple[list[float], list[float]]:
    """(A's middle / sides, that over B's), for every placement of the span within the time both ran."""
    ta, tb = [s[0] for s in a], [s[0] for s in b]
    t, end = max(ta[0], tb[0]) + 1.0, min(ta[-1], tb[-1]) - 1.0
    alone, twin = [], []
    while t + 2 * side + middle <= end:
        bounds = (t, t + side, t + side + middle, t + 2 * side + middle)
        per_run = []
        for steps, ts in ((a, ta), (b, tb)):
            r = [rate(steps, ts, x, y) for x, y in zip(bounds, bounds[1:])]
            per_run.append(r[1] / ((r[0] + r[2]) / 2))
        alone.append(per_run[0])
        twin.append(per_run[0] / per_run[1])
        t += stride
    return alone, twin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs=2, metavar=("RUN_A", "RUN_B"), help="analyse these recordings")
    parser.add_argument("--seconds", type=float, default=240.0, help="how long to record (default 240)")
    parser.add_argument("--sides", default="10,20,30", help="side lengths in seconds")
    parser.add_argument("--middle", type=float, default=60.0, help="the middle's length (the test's freeze: 60)")
    args = parser.parse_args()
    if args.runs:
        run_a, run_b = args.runs
    else:
        run_a, run_b = record(args.seconds, Path(tempfile.mkdtemp(prefix="fts-twin-")))
    a, b = load(run_a), load(run_b)
    if len(a) < 100 or len(b) < 100:
        print("fewer than 100 steps from phase 2 in a recording", file=sys.stderr)
        return 1
    print(f"A: {len(a)} steps, B: {len(b)} steps; middles of {args.middle:.0f} s")
    for side in (float(x) for x in args.sides.split(",")):
        alone, twin = ratios(a, b, side, args.middle)
        if len(alone) < 3:
            print(f"  {side:4.0f} s sides: too few placements ({len(alone)})")
            continue
        for name, values in (("alone", alone), ("vs twin", twin)):
            dev = statistics.median(abs(x - 1) for x in values)
            print(f"  {side:4.0f} s sides, {name:7s}: {len(values)} placements, deviation from 1 median {dev:.1%}, "
                  f"extremes {min(values):.3f} and {max(values):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
