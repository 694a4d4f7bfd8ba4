"""fts-tui benchmarks, headless (no terminal needed): display lag, memory, time to first full frame.

    .venv/bin/python bench/tui_bench.py            # everything (about 1.5 minutes on 2 cores)
    .venv/bin/python bench/tui_bench.py --quick    # shorter runs, same measurements
    .venv/bin/python bench/tui_bench.py --json out.json

What is measured:

* **display lag** at 1k and 10k events/s: a separate process runs the daemon's real event bus (``EventBus``) and
  publishes ``lr`` events (4 param groups each, one per "optimizer step") at a fixed rate over tcp loopback; the
  cockpit (``FtsApp`` + ``LiveSource``, headless) follows it. An event's lag is the time from its ``publish()`` on
  the daemon side (its ``ts``) until the screen that shows it has been rendered (the daemon's batch, the app's frame
  once the burst is in, then Textual's refresh); also from its arrival in the TUI. Target: p99 <= 100 ms at 10k/s.
* **memory after one million events**: a headless app is fed 1,000,000 events (lr with 4 groups, metrics, logs) in
  bursts through its state model while it keeps redrawing; RSS (and peak RSS) of the process after. Target <= 150 MB.
* **time to first full frame** with 100k history points: ``fts-tui replay`` of a 40k-step run (``events.jsonl``
  holding ~100k LR points, ~50k events), measured in a fresh interpreter from process start to the first rendered
  frame with every panel drawn; the same for ``attach`` to a daemon holding that history (its snapshot); and both
  again for a 100k-step run (~250k LR points, 125k events, 32 MB). Target <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TAGS = [f"lr-AdamW/phase{i}" for i in range(4)]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ------------------------------------------------------------------------------------------------ publisher


def _publisher(conn: Any, rate: int, seconds: float, history_steps: int, batch_ms: float | None,
               live: bool = False) -> None:
    """Child process: a real EventBus publishing lr events at ``rate`` per second (after optional history).

    ``live``: the history stops short of the run's end, and each step goes on with the history's LR tags and a noisy
    ``train_loss``, as a run being followed does."""
    import random

    from fts_daemon.bus import BusConfig, EventBus

    extra = {} if batch_ms is None else {"batch_ms": batch_ms}
    bus = EventBus(BusConfig(run="bench", pub="tcp://127.0.0.1:0", ctl="tcp://127.0.0.1:0", sndhwm=200_000,
                             queue_limit=1_000_000, **extra))
    bus.start()
    step = 0
    tags = TAGS
    if history_steps:
        from tests.data.make_recordings import build_run

        history = build_run(steps_per_epoch=max(history_steps // 14, 1))
        if live:
            history = [e for e in history if e.kind != "state" or e.data.get("state") not in ("finished", "failed")]
            tags = list(next(e for e in reversed(history) if e.kind == "lr").data["lrs"])
        for e in history:
            bus.publish(e.kind, e.data, e.step, e.epoch)
        while bus._queue.qsize():  # let the I/O thread fold the history in
            time.sleep(0.05)
        step = max(e.step or 0 for e in history) + 1 if live else history_steps
    rng = random.Random(0)
    conn.send(bus.endpoints)
    conn.recv()  # go
    start = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while sent < due:
            bus.publish("lr", {"lrs": {t: 1e-3 / (1 + step * 1e-4) for t in tags}}, step, step // 1000)
            if live:
                bus.publish("metric", {"metrics": {"train_loss": 0.3 + 0.2 * rng.random()}, "stage": "train"}, step,
                            step // 1000)
            sent += 1
            step += 1
        time.sleep(0.0005)
    time.sleep(0.5)
    conn.send(sent)
    conn.recv()
    bus.close()


def start_publisher(rate: int, seconds: float, history_steps: int = 0, batch_ms: float | None = None,
                    live: bool = False) -> tuple[Any, Any, tuple[str, str]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_publisher, args=(child, rate, seconds, history_steps, batch_ms, live), daemon=True)
    proc.start()
    endpoints = parent.recv()
    return proc, parent, endpoints


# ------------------------------------------------------------------------------------------------ lag


def bench_lag(rate: int, seconds: float, batch_ms: float | None = None) -> dict[str, Any]:
    from fts_tui.app import FtsApp
    from fts_tui.client import LiveSource, Target
    from fts_tui.state import RunState

    pending: list[tuple[float, float]] = []  # (published, received) per event not yet on screen
    lags: list[float] = []  # publish -> on screen
    tui_lags: list[float] = []  # received by the TUI -> on screen
    staleness: list[float] = []  # per frame: age of the newest event it shows (vs its publish time)

    class TimedState(RunState):
        def _on_lr(self, ev: Any) -> None:
            pending.append((ev.ts, time.time()))
            super()._on_lr(ev)

    proc, conn, (pub, ctl) = start_publisher(rate, seconds, batch_ms=batch_ms)

    async def run() -> dict[str, Any]:
        source = LiveSource(Target(ctl=ctl, pub=pub), TimedState())
        app = FtsApp(source)

        def drawn(batch: list[tuple[float, float]]) -> None:
            now = time.time()
            lags.extend(now - ts for ts, _ in batch)
            tui_lags.extend(now - recv for _, recv in batch)
            staleness.append(now - max(ts for ts, _ in batch))

        def after_redraw(a: FtsApp) -> None:
            if pending:
                batch = pending[:]
                pending.clear()
                a.call_after_refresh(drawn, batch)  # once Textual has rendered the frame with these events

        app.after_redraw = after_redraw
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 20
            while source.state.connection != "live":
                if time.monotonic() > deadline:
                    raise RuntimeError("bench: the client never went live")
                await pilot.pause(0.05)
            cpu0, wall0 = time.process_time(), time.monotonic()
            conn.send("go")
            await pilot.pause(seconds + 0.8)
            sent = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            await pilot.pause(0.3)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            frames = app.frames
        conn.send("bye")
        return {"sent": sent, "received": len(lags), "frames": frames, "app_cpu_s": round(cpu, 2),
                "app_cpu_pct": round(100 * cpu / wall, 1)}

    try:
        info = asyncio.run(run())
    finally:
        proc.join(10)
    ms = [x * 1000 for x in lags]
    tui = [x * 1000 for x in tui_lags]
    stale = [x * 1000 for x in staleness[1:]]  # the first frame shows the backlog of the start
    return {
        "rate": rate,
        "seconds": seconds,
        "daemon_batch_ms": batch_ms,
        **info,
        "frame_staleness_p50_ms": round(pct(stale, 50), 1),
        "frame_staleness_p99_ms": round(pct(stale, 99), 1),
        "tui_lag_p50_ms": round(pct(tui, 50), 1),
        "tui_lag_p99_ms": round(pct(tui, 99), 1),
        "tui_lag_max_ms": round(max(tui), 1) if tui else None,
        "lag_p50_ms": round(pct(ms, 50), 1),
        "lag_p99_ms": round(pct(ms, 99), 1),
        "lag_max_ms": round(max(ms), 1) if ms else None,
    }


# ------------------------------------------------------------------------------------------------ follow


def bench_follow(rate: int, seconds: float, history_steps: int, mode: str) -> dict[str, Any]:
    """CPU of the cockpit (``mode`` "app": at its full frame rate; "budget": with fts-tui's default CPU budget, the
    host taken as busy) or of a bare client ("bare", the baseline: the same socket, decoding and state model, nothing
    drawn) following a run that has ``history_steps`` behind it and goes on at ``rate`` steps a second (an ``lr``
    event of 4 groups and a ``train_loss`` each)."""
    from fts_tui.app import FtsApp
    from fts_tui.client import LiveSource, Target
    from fts_tui.pacing import DEFAULT_CPU_BUDGET

    proc, conn, (pub, ctl) = start_publisher(rate, seconds, history_steps, live=True)

    async def run() -> dict[str, Any]:
        source = LiveSource(Target(ctl=ctl, pub=pub))

        async def measure(pause: Any) -> dict[str, Any]:
            deadline = time.monotonic() + 30
            while source.state.connection != "live" or source.state.step is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("bench: the client never went live")
                await pause(0.05)
            await pause(0.5)  # the snapshot's first frame drawn
            cpu0, wall0 = time.process_time(), time.monotonic()
            conn.send("go")
            await pause(seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            return {"cpu_pct": round(100 * cpu / wall, 1), "steps": source.state.step}

        if mode != "bare":
            budget = DEFAULT_CPU_BUDGET if mode == "budget" else None
            cockpit = FtsApp(source, cpu_budget=budget, busy=lambda: True)
            async with cockpit.run_test(size=(160, 48)) as pilot:
                out = await measure(pilot.pause)
                out["frames"] = cockpit.frames
                out["chart_rows_repainted"] = cockpit.lr_chart.repainted_rows + cockpit.metric_chart.repainted_rows
        else:
            task = asyncio.get_running_loop().create_task(source.run())
            out = await measure(asyncio.sleep)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        conn.send("bye")
        return out

    try:
        return asyncio.run(run())
    finally:
        proc.join(10)


# ------------------------------------------------------------------------------------------------ memory


def bench_memory(n_events: int) -> dict[str, Any]:
    from fts_daemon.events import Event
    from fts_tui.app import FtsApp
    from fts_tui.source import MemorySource

    base_rss, _ = rss_mb()

    async def run() -> dict[str, Any]:
        source = MemorySource(label="bench")
        app = FtsApp(source)
        state = source.state
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            t0 = time.perf_counter()
            seq = 0
            step = 0
            chunk = 20_000
            while seq < n_events:
                for _ in range(min(chunk, n_events - seq)):
                    seq += 1
                    if seq % 1000 == 0:
                        ev = Event("log", seq, time.time(), "bench", "d", {"level": "info", "message": f"event {seq}"})
                    elif seq % 10 == 0:
                        ev = Event("metric", seq, time.time(), "bench", "d",
                                   {"metrics": {"train_loss": 1.0 / (1 + step), "val_acc": (step % 97) / 97}, "stage": "train"}, step)
                    else:
                        step += 1
                        ev = Event("lr", seq, time.time(), "bench", "d", {"lrs": {t: 1e-3 / (1 + step * 1e-5) for t in TAGS}}, step)
                    state.apply(ev)
                await pilot.pause(0.02)  # the app redraws between bursts, as it would live
            await pilot.pause(0.3)
            elapsed = time.perf_counter() - t0
            rss, peak = rss_mb()
            stored = sum(len(s.xs) for s in list(state.lr.values()) + list(state.metrics.values()))
            return {"events": n_events, "apply_rate_per_s": round(n_events / elapsed), "rss_mb": round(rss, 1),
                    "peak_rss_mb": round(peak, 1), "stored_points": stored, "log_entries": len(state.log),
                    "frames": app.frames}

    out = asyncio.run(run())
    out["rss_before_mb"] = round(base_rss, 1)
    return out


# ------------------------------------------------------------------------------------------------ first frame

FIRST_FRAME_CHILD = r"""
import asyncio, sys, time
t0 = float(sys.argv[1])
mode, target = sys.argv[2], sys.argv[3]
from fts_tui.app import FtsApp
if mode == "replay":
    from fts_tui.source import ReplaySource
    source = ReplaySource(target)
    source.load()
else:
    from fts_tui.client import LiveSource, Target
    ctl, pub = target.split(",")
    source = LiveSource(Target(ctl=ctl, pub=pub))
app = FtsApp(source)
done = asyncio.Event()
def full(a):
    s = a.state
    if s.lr and s.phases and a.query_one("#lr-chart").builds and a.query_one("#metric-chart").builds:
        done.set()
def hook(a):
    a.call_after_refresh(full, a)
app.after_redraw = hook
async def main():
    async with app.run_test(size=(160, 48)):
        await asyncio.wait_for(done.wait(), 30)
        t = time.time() - t0
        s = app.state
        points = sum(len(x) for x in s.lr.values())
        print(f"{t:.3f} {points} {sum(len(x.xs) for x in s.lr.values())}")
asyncio.run(main())
"""


def first_frame(mode: str, target: str, repeats: int) -> dict[str, Any]:
    times = []
    detail = ""
    for _ in range(repeats):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", FIRST_FRAME_CHILD, repr(t0), mode, target], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        seconds, points, stored = out.stdout.split()
        times.append(float(seconds))
        detail = f"{points} LR points received, {stored} stored"
    return {"mode": mode, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "runs": [round(t, 3) for t in times], "detail": detail}


def bench_first_frame(steps: int, repeats: int) -> list[dict[str, Any]]:
    from fts_daemon.events import event_to_json_line
    from tests.data.make_recordings import build_run

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        events = build_run(steps_per_epoch=max(steps // 14, 1))
        with open(run_dir / "events.jsonl", "w", encoding="utf-8") as fh:
            for e in events:
                fh.write(event_to_json_line(e) + "\n")
        size_mb = (run_dir / "events.jsonl").stat().st_size / 1e6
        r = first_frame("replay", str(run_dir), repeats)
        r["events"] = len(events)
        r["steps"] = steps
        r["file_mb"] = round(size_mb, 1)
        results.append(r)
    proc, conn, (pub, ctl) = start_publisher(rate=1, seconds=0.1, history_steps=steps)
    try:
        r = first_frame("attach", f"{ctl},{pub}", repeats)
        r["events"] = len(events)
        r["steps"] = steps
        results.append(r)
    finally:
        conn.send("go")
        conn.recv()
        conn.send("bye")
        proc.join(10)
    return results


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (2 s per rate, 300k events, 1 repeat)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", choices=("lag", "follow", "memory", "first-frame"))
    parser.add_argument("--daemon-batch-ms", type=float, default=None,
                        help="BusConfig.batch_ms for the publishing daemon (default: the daemon's own default)")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 4.0
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.only in (None, "lag"):
        from fts_daemon.bus import BusConfig
        from fts_tui.app import FtsApp

        poll = args.daemon_batch_ms if args.daemon_batch_ms is not None else BusConfig.batch_ms
        print(f"(daemon: batches at least {poll:g} ms apart, woken by the first event after a pause; "
              f"the TUI draws each burst once it is in, at most {FtsApp.DEFAULT_REDRAW_HZ:g} frames a second)", flush=True)
        results["lag"] = [bench_lag(rate, seconds, args.daemon_batch_ms) for rate in (1_000, 10_000)]
        for r in results["lag"]:
            print(f"display lag @ {r['rate']:>6}/s for {r['seconds']:g}s: received {r['received']}/{r['sent']}, "
                  f"{r['frames']} redraws, app CPU {r['app_cpu_s']} s ({r['app_cpu_pct']}% of a core)\n"
                  f"    newest event on each frame, published -> on screen: p50 {r['frame_staleness_p50_ms']} ms, "
                  f"p99 {r['frame_staleness_p99_ms']} ms\n"
                  f"    every event, received -> on screen: p50 {r['tui_lag_p50_ms']} ms, p99 {r['tui_lag_p99_ms']} ms, "
                  f"max {r['tui_lag_max_ms']} ms\n"
                  f"    every event, published -> on screen: p50 {r['lag_p50_ms']} ms, p99 {r['lag_p99_ms']} ms, max {r['lag_max_ms']} ms"
                  f" (includes the daemon's send delay)", flush=True)
    if args.only in (None, "follow"):
        rate, history = 300, 40_000
        modes = ("bare", "app", "budget")
        rounds = [{m: bench_follow(rate, seconds, history, m) for m in modes} for _ in range(2 if args.quick else 3)]
        results["follow"] = rounds
        cpu = {m: statistics.median(r[m]["cpu_pct"] for r in rounds) for m in modes}
        frames = {m: statistics.median(r[m]["frames"] for r in rounds) for m in ("app", "budget")}
        print(f"following a run {history:,} steps in, going on at {rate} steps/s (an lr event of 4 groups and a "
              f"train_loss each), 160x48, medians of {len(rounds)} rounds, % of a core: cockpit {cpu['app']:.1f} "
              f"({frames['app']:.0f} frames in {seconds:g}s); with fts-tui's CPU budget on a busy host "
              f"{cpu['budget']:.1f} ({frames['budget']:.0f} frames); a bare client (no screen) {cpu['bare']:.1f}",
              flush=True)
    if args.only in (None, "memory"):
        m = bench_memory(300_000 if args.quick else 1_000_000)
        results["memory"] = m
        print(f"memory after {m['events']:,} events: RSS {m['rss_mb']} MB (peak {m['peak_rss_mb']} MB, "
              f"{m['rss_before_mb']} MB before the app), {m['stored_points']} stored chart points, "
              f"{m['log_entries']} log entries, applied at {m['apply_rate_per_s']:,}/s", flush=True)
    if args.only in (None, "first-frame"):
        # 40k steps of the demo run (1 -> 4 param groups) hold ~100k LR points; 100k steps ~250k
        ff = bench_first_frame(40_000, 1 if args.quick else 3) + bench_first_frame(100_000, 1 if args.quick else 3)
        results["first_frame"] = ff
        for r in ff:
            print(f"first full frame, {r['mode']} of a {r['steps'] // 1000}k-step run ({r['events']:,} events"
                  + (f", {r['file_mb']} MB" if "file_mb" in r else "") + f"): median {r['median_s']} s, "
                  f"max {r['max_s']} s ({r['detail']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
