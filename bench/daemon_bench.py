"""The daemon's costs, measured against baselines taken in the same run.

1. Training throughput: steady-state steps/s (from the third epoch on) of ``fts-daemon`` (events published, a live
   subscriber in another process reading every event) vs plain Lightning on the same config. Runs are interleaved
   (plain, daemon, daemon, plain, ...) so machine noise hits both alike; the figure is the median of per-pair
   ratios (also shown: best run vs best run, the wall time added per step, the training thread's own CPU time per
   step, and the I/O thread's CPU share). Target: >= 0.98.
1b. The event stream's per-step cost within one daemon run (``--windows RUNS``, default 3; 0 skips it): the tap's
   publishing is switched off and on every few dozen steps, each "on" window (an ``lr`` event per step, metrics, the
   subscriber decoding them) against each "off" window beside it, each window timed after an untimed start that lets
   the previous window's events drain. Neighbouring windows of one process share its memory placement and the
   machine's load of that second, which separate runs do not; the off windows' deviation from their own neighbours
   is printed as the method's noise. What it leaves out: per-epoch costs (windows across an epoch end are dropped)
   such as the crash-safety checkpoint, which ``--checkpoint-overhead`` bounds to 1% of the run.
2. Bus throughput: the highest paced rate of ``lr`` events (8 groups each) that one subscriber process receives with
   no loss, plus the unpaced burst rate and how much of it arrived.
3. Per-event cost on the training thread: ``EventBus.publish_lr`` (what the tap calls once a step) in a burst and
   as the first event after a pause (when it wakes the sleeping I/O thread), against the alternatives: ``queue.Queue.put_nowait``
   and an inproc PAIR socket (which needs the event encoded on the training thread).

    python bench/daemon_bench.py              # everything (about 15 minutes on 2 cores)
    python bench/daemon_bench.py --skip events,bus,pairs   # 1b. only (about 5 minutes)
    python bench/daemon_bench.py --skip events,bus,pairs --no-subscriber   # 1b. without the subscriber process
    python bench/daemon_bench.py --skip events,bus,pairs --no-subscriber --hooks-only   # 1b. the tap's hooks alone
    python bench/daemon_bench.py --skip events,bus,pairs --subscriber-idle   # 1b. the subscriber under SCHED_IDLE
    python bench/daemon_bench.py --skip events,bus --windows 0 --epochs 12   # 1. only, longer runs
    python bench/daemon_bench.py --skip events,bus --windows 0 --sizes tiny \
        --subscriber-kinds state,schedule,transition,edit,log,heartbeat   # 1. with no lr/metric data to the subscriber
    python bench/daemon_bench.py --quick      # fewer pairs and rates
    python bench/daemon_bench.py --sizes large --threads 1   # torch on one core, the daemon's threads on the other
    python bench/daemon_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import zmq

from fts_daemon import events as ev
from fts_daemon.bus import BusConfig, EventBus

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo_explicit_reinit_lr.yaml"
LR_DATA = {"lrs": {f"Explicit_Reinit_LR_Scheduler/pg{i}": 1.0e-3 / (i + 1) for i in range(1, 9)}}
LR_TAGS, LR_VALUES = tuple(LR_DATA["lrs"]), list(LR_DATA["lrs"].values())  # as the tap publishes them
SIZES = {
    # name: LightningCLI overrides on top of the explicit demo (no step delay): steps of ~1 ms (tiny, 512 per epoch),
    # ~6 ms (large, 9.4M parameters, 128 per epoch) and ~45 ms (xl, 38M parameters, 30 per epoch) on 2 cores; each
    # run trains 2-7 s so that per-run costs (start-up, the first checkpoint) do not pass for per-step
    "tiny": ["--model.init_args.hidden=32", "--model.init_args.num_layers=2", "--data.init_args.batch_size=32",
             "--data.init_args.num_train=16384"],
    "large": ["--model.init_args.hidden=384", "--model.init_args.num_layers=4", "--data.init_args.batch_size=64",
              "--data.init_args.num_train=8192"],
    "xl": ["--model.init_args.hidden=1024", "--model.init_args.num_layers=6", "--data.init_args.batch_size=64",
           "--data.init_args.num_train=1920"],
}
STEADY_FROM = 2  # the first epoch of the measured span in 1. (see _Timer)
DAEMON_OPTIONS: dict[str, Any] = {}  # StartOptions given on the command line (--batch-ms)
COMMON = ["--model.init_args.step_delay=0", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"]


# --------------------------------------------------------------------------------------------- subscriber process


def subscriber(pub: str, expect: int | None, idle: float) -> None:
    """Count events (decoding each, as a client must), check seq continuity, print a JSON summary."""
    if os.environ.get("FTS_BENCH_SUBSCRIBER_IDLE") == "1":  # --subscriber-idle; before ZeroMQ starts its thread
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)  # the daemon binds after we connect: retry quickly
    kinds = os.environ.get("FTS_BENCH_SUBSCRIBER_KINDS")  # --subscriber-kinds
    for prefix in ([ev.TOPIC_PREFIX + k for k in kinds.split(",")] if kinds else [ev.TOPIC_PREFIX]):
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sub.connect(pub)
    print(json.dumps({"ready": True}), flush=True)
    count = gaps = lost = wakeups = 0
    last = None
    first_t = last_t = None
    cpu0: float | None = None
    done = False
    while not done:
        if not sub.poll(int(idle * 1000)):
            break
        if cpu0 is None:
            cpu0 = time.process_time()
        wakeups += 1
        while True:  # drain what has arrived (a batch) without a poll per event, as the TUI's client does
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = ev.decode_event(frames)
            now = time.perf_counter()
            first_t = first_t or now
            last_t = now
            if last is not None and event.seq != last + 1:
                gaps += 1
                lost += event.seq - last - 1
            last = event.seq
            count += 1
            if (event.kind == ev.STATE and event.data.get("state") in ("finished", "failed")) or (
                expect is not None and count >= expect
            ):
                done = True
                break
    elapsed = (last_t - first_t) if first_t and last_t else 0.0
    # the whole process's CPU (its ZeroMQ I/O thread included) from the first event on
    cpu = time.process_time() - cpu0 if cpu0 is not None else 0.0
    print(json.dumps({"count": count, "gaps": gaps, "lost": lost, "elapsed": elapsed, "last_seq": last,
                      "cpu_s": cpu, "wakeups": wakeups}), flush=True)


def start_subscriber(pub: str, expect: int | None = None, idle: float = 30.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--subscriber", pub, "--expect", str(expect or 0), "--idle", str(idle)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["ready"]
    return proc


def subscriber_result(proc: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- 3. per-event cost


def per_event_cost(n: int) -> dict[str, float]:
    """Microseconds per event on the calling (training) thread."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ftsb") as tmp:
        # EventBus.publish_lr with the I/O thread draining concurrently (what training sees)
        bus = EventBus(BusConfig(run="b", pub=f"ipc://{tmp}/p", ctl=f"ipc://{tmp}/c", queue_limit=n + 10,
                                 events_path=Path(tmp) / "events.jsonl", heartbeat_s=60))
        bus.start()
        t = time.perf_counter()
        for i in range(n):
            bus.publish_lr(LR_TAGS, LR_VALUES, i, 0)
        out["bus_publish_live"] = (time.perf_counter() - t) / n * 1e6
        # the first event after a pause: the I/O thread sleeps, so publish() also writes its wake-up byte
        total, pauses = 0.0, min(n // 100, 2000)
        for i in range(pauses):
            time.sleep(0.002 + bus.config.batch_ms / 1000)  # the batch gap has passed: the I/O thread is asleep
            t = time.perf_counter()
            bus.publish_lr(LR_TAGS, LR_VALUES, i, 0)
            total += time.perf_counter() - t
        out["bus_publish_after_pause"] = total / pauses * 1e6
        # paced like training: an lr and a metric event per step at 300 and at 30 steps/s (mean per event)
        for steps_per_s in (300, 30):
            total, count, period = 0.0, 0, 1.0 / steps_per_s
            next_step = time.perf_counter()
            for i in range(max(steps_per_s, 60)):
                next_step += period
                while time.perf_counter() < next_step:
                    time.sleep(period / 4)
                t = time.perf_counter()
                bus.publish_lr(LR_TAGS, LR_VALUES, i, 0)
                bus.publish(ev.METRIC, {"metrics": {"train_loss": 0.5}, "stage": "train"}, i, 0)
                total += time.perf_counter() - t
                count += 2
            out[f"bus_publish_paced_{steps_per_s}_steps_s"] = total / count * 1e6
        bus.close()
        # the same call with nothing draining (pure enqueue)
        idle = EventBus(BusConfig(run="b", pub=f"ipc://{tmp}/p2", ctl=f"ipc://{tmp}/c2", queue_limit=n + 10))
        t = time.perf_counter()
        for i in range(n):
            idle.publish_lr(LR_TAGS, LR_VALUES, i, 0)
        out["bus_publish_enqueue_only"] = (time.perf_counter() - t) / n * 1e6
    q: queue.Queue[Any] = queue.Queue(maxsize=n + 10)
    t = time.perf_counter()
    for i in range(n):
        q.put_nowait((ev.LR, LR_DATA, i, 0, time.time()))
    out["queue_Queue_put_nowait"] = (time.perf_counter() - t) / n * 1e6
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.setsockopt(zmq.SNDHWM, 0)
    b.setsockopt(zmq.RCVHWM, 0)
    b.bind("inproc://bench")
    a.connect("inproc://bench")
    drained = threading.Event()

    def drain() -> None:
        for _ in range(n):
            b.recv_multipart()
        drained.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    t = time.perf_counter()
    for i in range(n):
        a.send_multipart([b"fts.v1.lr", ev.dumps({"kind": "lr", "step": i, "ts": time.time(), "data": LR_DATA})])
    out["inproc_PAIR_encode_and_send"] = (time.perf_counter() - t) / n * 1e6
    drained.wait(60)
    a.close(0)
    b.close(0)
    ctx.term()
    return out


# --------------------------------------------------------------------------------------------- 2. bus throughput


def bus_rate(rate: float | None, seconds: float, tmp: str) -> dict[str, Any]:
    """Publish lr events at ``rate``/s (None: as fast as possible) for ``seconds``; one subscriber process counts."""
    bus = EventBus(BusConfig(run="b", pub=f"ipc://{tmp}/r.pub", ctl=f"ipc://{tmp}/r.ctl", heartbeat_s=3600,
                             events_path=Path(tmp) / "rate.jsonl"))
    pub, _ = bus.start()
    proc = start_subscriber(pub, idle=5.0)
    time.sleep(0.5)  # let the subscription reach the PUB socket (slow joiner)
    n = int((rate or 400_000) * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        if rate is not None and i % 100 == 0:
            ahead = i / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        bus.publish_lr(LR_TAGS, LR_VALUES, i, 0)
    sent_for = time.perf_counter() - t0
    bus.publish(ev.STATE, {"state": "finished", "error": None})
    bus.close(timeout=120)
    got = subscriber_result(proc)
    return {
        "offered_rate": rate,
        "events": n,
        "publish_seconds": sent_for,
        "received": got["count"] - 1,
        "lost": n - (got["count"] - 1),
        "dropped_in_queue": bus.dropped,
        "received_rate": (got["count"] - 1) / got["elapsed"] if got["elapsed"] else 0.0,
    }


def bus_throughput(rates: list[float], seconds: float) -> dict[str, Any]:
    results = []
    best = 0.0
    with tempfile.TemporaryDirectory(prefix="ftsb") as tmp:
        for rate in rates:
            r = bus_rate(rate, seconds, tmp)
            results.append(r)
            if r["lost"] == 0:
                best = max(best, r["received_rate"])
        burst = bus_rate(None, seconds, tmp)
    return {"paced": results, "max_lossless_rate": best, "burst": burst}


# --------------------------------------------------------------------------------------------- 1. training


class _Timer:
    """Steady-state steps/s: from the start of epoch ``STEADY_FROM`` to the end of training (includes validation and
    the config's ModelCheckpoint saves, identical on both sides), plus the training thread's own CPU time per step
    over the same span. Left out: start-up and the first two epochs, where one-off costs fall: every daemon run
    saves its first crash-safety checkpoint at the end of epoch 0 and writes it in the background during epoch 1
    (later saves are spaced to take at most ``--checkpoint-overhead``, 1%, of the run's time: a run of a few seconds
    would hold one save and nothing to amortize it over)."""

    def __init__(self) -> None:
        from pytorch_lightning.callbacks import Callback

        timer = self

        class TimerCallback(Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                timer.train_t0 = time.perf_counter()

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                if trainer.current_epoch == STEADY_FROM:
                    timer.t0, timer.c0 = time.perf_counter(), time.thread_time()
                    timer.step0 = int(trainer.global_step)

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                now = time.perf_counter()
                timer.elapsed, timer.train_elapsed = now - timer.t0, now - timer.train_t0
                timer.cpu = time.thread_time() - timer.c0
                timer.steps = int(trainer.global_step) - timer.step0

        self.callback = TimerCallback()
        self.t0 = self.c0 = self.elapsed = self.cpu = self.train_t0 = self.train_elapsed = 0.0
        self.io_cpu = 0.0  # the daemon's I/O thread, whole run
        self.steps = self.step0 = 0

    @property
    def rate(self) -> float:
        return self.steps / self.elapsed

    @property
    def cpu_us_per_step(self) -> float:
        return self.cpu / self.steps * 1e6


def plain_run(overrides: list[str], tmp: str) -> _Timer:
    from fts_daemon.runner import build_from_config, find_fts_callback, resolve_schedule_path

    timer = _Timer()
    built = build_from_config([DEMO], overrides, trainer_defaults={"default_root_dir": tmp}, callbacks=[timer.callback])
    resolve_schedule_path(find_fts_callback(built.trainer), [DEMO])
    built.trainer.fit(built.model, datamodule=built.datamodule)
    return timer


def run_daemon(overrides: list[str], tmp: str, run: str, callback: Any, subscribe: bool = True,
               **options: Any) -> tuple[Any, dict[str, Any]]:
    """Train the demo config in an in-process daemon (with ``callback`` added, and a subscriber process reading
    every event unless ``subscribe`` is False); returns the finished daemon and the subscriber's summary."""
    from fts_daemon import registry
    from fts_daemon.runner import Daemon, StartOptions

    proc = start_subscriber(registry.ipc_endpoints(run)[0], idle=120.0) if subscribe else None
    with open(os.devnull, "w") as devnull:
        daemon = Daemon(StartOptions(configs=[str(DEMO)], run=run, run_dir=Path(tmp) / run, progress=False,
                                     overrides=overrides, install_signals=False, out=devnull, callbacks=[callback],
                                     **DAEMON_OPTIONS, **options))
        rc = daemon.run()
    assert rc == 0, daemon.error
    assert daemon.bus is not None
    return daemon, subscriber_result(proc) if proc is not None else {"count": 0, "lost": 0}


def daemon_run(overrides: list[str], tmp: str, run: str, checkpoint_every: int = 1) -> tuple[_Timer, dict[str, Any]]:
    timer = _Timer()
    daemon, sub = run_daemon(overrides, tmp, run, timer.callback, checkpoint_every=checkpoint_every)
    timer.io_cpu = daemon.bus.io_cpu_s
    return timer, sub


def training(pairs: int, sizes: list[str], epochs: int, checkpoint_every: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        overrides = [*COMMON, *SIZES[size], f"--trainer.max_epochs={epochs}"]
        plain, daemon, ratios, subs, cpu_plain, cpu_daemon, io_share = [], [], [], [], [], [], []
        with tempfile.TemporaryDirectory(prefix="ftsb") as tmp:
            os.environ["FTS_RUNTIME_DIR"] = tmp
            plain_run(overrides, tmp)  # warm-up: imports, allocator, caches
            for i in range(pairs):
                if i % 2 == 0:  # alternate the order (ABBA) so a drift in machine load does not favour one side
                    p = plain_run(overrides, tmp)
                    d, sub = daemon_run(overrides, tmp, f"bench-{size}-{i}", checkpoint_every)
                else:
                    d, sub = daemon_run(overrides, tmp, f"bench-{size}-{i}", checkpoint_every)
                    p = plain_run(overrides, tmp)
                plain.append(p.rate)
                daemon.append(d.rate)
                ratios.append(d.rate / p.rate)
                cpu_plain.append(p.cpu_us_per_step)
                cpu_daemon.append(d.cpu_us_per_step)
                io_share.append(d.io_cpu / d.train_elapsed)
                subs.append(sub)
                print(f"  {size} pair {i + 1}/{pairs}: plain {p.rate:7.1f} steps/s, daemon {d.rate:7.1f} steps/s, "
                      f"ratio {d.rate / p.rate:.3f}; training-thread CPU {p.cpu_us_per_step:6.0f} vs "
                      f"{d.cpu_us_per_step:6.0f} us/step; subscriber got {sub['count']} events ({sub['lost']} lost)",
                      flush=True)
        out[size] = {
            "plain_steps_per_s": statistics.median(plain),
            "daemon_steps_per_s": statistics.median(daemon),
            "ratio_median": statistics.median(ratios),
            "ratio_interval": _median_interval(ratios),
            "ratio_best": max(daemon) / max(plain),
            # what the daemon adds to each step, in wall time
            "added_us_per_step": 1e6 / statistics.median(daemon) - 1e6 / statistics.median(plain),
            "ratios": ratios,
            "train_thread_cpu_us_per_step_plain": statistics.median(cpu_plain),
            "train_thread_cpu_us_per_step_daemon": statistics.median(cpu_daemon),
            "io_thread_cpu_share": statistics.median(io_share),
            "subscriber_events": [s["count"] for s in subs],
            "subscriber_lost": sum(s["lost"] for s in subs),
        }
    return out


# --------------------------------------------------------------------------------------------- 1b. same-run windows


class _Windows:
    """Switches the daemon's event stream off and on every ``steps`` steps within one run and times each window.

    An "on" window is the daemon as it runs (an ``lr`` event per step, train metrics, a live subscriber decoding
    them); an "off" window has the tap publish nothing, so the I/O thread and the subscriber sleep. Each on window is
    compared with each off window beside it, in the same process a fraction of a second apart: what the stream costs
    per step, without the run-to-run spread of separate processes. A window is timed from its
    ``guard``-th step on, so that the I/O thread's batch (``batch_ms``) and the subscriber's backlog from the window
    before have ended. Off windows compared with their own neighbours give the noise floor of the method.
    """

    def __init__(self, steps: int, guard: int) -> None:
        from pytorch_lightning.callbacks import Callback

        from fts_daemon.tap import DaemonTap

        windows = self
        self.steps, self.guard = steps, guard
        # (on, seconds) per timed window; None where a window held an epoch end (validation, checkpoint)
        self.spans: list[tuple[bool, float] | None] = []
        self._open: tuple[bool, int, float] | None = None  # (on, step, time) of the window being timed

        class WindowCallback(Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                step = int(trainer.global_step)
                if trainer.current_epoch < STEADY_FROM:  # steady state, as in 1.
                    return
                phase = step % windows.steps
                if phase == 0:
                    now = time.perf_counter()
                    if windows._open is not None:
                        on, began, t0 = windows._open
                        whole = step - began == windows.steps - windows.guard
                        windows.spans.append((on, now - t0) if whole else None)
                        windows._open = None
                    for cb in trainer.callbacks:
                        if isinstance(cb, DaemonTap):
                            cb.active = (step // windows.steps) % 2 == 0
                elif phase == windows.guard:
                    windows._open = ((step // windows.steps) % 2 == 0, step, time.perf_counter())

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                if windows._open is not None:
                    windows.spans.append(None)
                    windows._open = None

        self.callback = WindowCallback()

    def ratios(self) -> tuple[list[float], list[float]]:
        """(on / off, off / off) rate ratios of neighbouring windows.

        Every two adjacent whole windows (one on, one off, in either order) give one on / off ratio; every two whole
        off windows two apart give one off / off ratio. Each ratio compares one window with one other, so with no
        difference between on and off its median is 1 whatever the windows' time distribution (skewed: a few slow
        windows). An earlier form, one window against the mean of its two neighbours, read ~1% high on that skew
        (its off / off median was 1.01); the order of a pair (on after off, off after on) alternates, so a drift
        within the run cancels out.
        """
        spans = self.spans
        on_ratios, off_ratios = [], []
        for i in range(1, len(spans)):
            here, left = spans[i], spans[i - 1]
            if here is not None and left is not None and here[0] != left[0]:
                on, off = (here, left) if here[0] else (left, here)
                on_ratios.append(off[1] / on[1])
            if i >= 2:
                far = spans[i - 2]
                if here is not None and far is not None and not here[0] and not far[0]:
                    off_ratios.append(far[1] / here[1])
        return on_ratios, off_ratios


# longer epochs for the window runs (~3-6 s), so that most windows fall inside one (windows across an epoch end are
# left out): 2048, 512 and 120 steps
WINDOW_DATA = {"tiny": ["--data.init_args.num_train=65536"], "large": ["--data.init_args.num_train=32768"],
               "xl": ["--data.init_args.num_train=7680"]}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _median_interval(values: list[float], share: int = 1) -> tuple[float, float]:
    """The median's 95% interval from the order statistics (distribution-free). ``share``: how many values each
    measurement enters (2 for neighbouring pairs, each window being in two): the interval widens by its root."""
    if not values:
        return math.nan, math.nan
    ordered, half = sorted(values), 0.98 * (share * len(values)) ** 0.5
    return ordered[max(0, int(len(values) / 2 - half))], ordered[min(len(values) - 1, int(len(values) / 2 + half))]


def windows(
    sizes: list[str], runs: int, epochs: int, window_steps: dict[str, tuple[int, int]], subscribe: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        overrides = [*COMMON, *SIZES[size], *WINDOW_DATA[size], f"--trainer.max_epochs={epochs}"]
        on_all, off_all = [], []
        with tempfile.TemporaryDirectory(prefix="ftsw") as tmp:
            os.environ["FTS_RUNTIME_DIR"] = tmp
            for i in range(runs):
                run = f"win-{size}-{i}"
                win = _Windows(*window_steps[size])
                _, sub = run_daemon(overrides, tmp, run, win.callback, subscribe=subscribe)
                on, off = win.ratios()
                on_all += on
                off_all += off
                sub_cpu = sub.get("cpu_s", 0.0) / max(1, sub["count"]) * 1e6
                print(f"  {size} run {i + 1}/{runs}: stream on / off {_median(on):.3f} (median of {len(on)} pairs of windows of "
                      f"{win.steps} steps, the last {win.steps - win.guard} timed), off / off {_median(off):.3f}; subscriber "
                      f"got {sub['count']} events ({sub['lost']} lost), its CPU {sub_cpu:.0f} us per event, "
                      f"{sub['count'] / max(1, sub.get('wakeups', 0)):.1f} events per wake-up", flush=True)
        out[size] = {"ratio_median": _median(on_all), "windows": len(on_all),
                     "noise": _median([abs(x - 1) for x in off_all]), "null": _median(off_all), "ratios": on_all,
                     "interval": _median_interval(on_all, share=2),
                     "window_steps": window_steps[size][0]}
    return out


def drop_lossy_events() -> None:
    """Make ``EventBus.publish`` drop ``lr`` and ``metric`` events on arrival (the tap still reads the LRs and
    metrics and calls it): the I/O thread then has nothing to encode, send or record for them."""
    from fts_daemon.bus import LOSSY_KINDS

    publish = EventBus.publish

    def hooks_only(self: EventBus, kind: str, data: dict[str, Any], step: int | None = None,
                   epoch: int | None = None) -> bool:
        return True if kind in LOSSY_KINDS else publish(self, kind, data, step, epoch)

    def lr_hooks_only(self: EventBus, tags: tuple[str, ...], values: list[float], step: int | None = None,
                      epoch: int | None = None) -> bool:
        return True

    EventBus.publish = hooks_only  # type: ignore[method-assign]
    EventBus.publish_lr = lr_hooks_only  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--sizes", default="tiny,large,xl")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for both sides (default: torch's choice, "
                        "one per core); 1 leaves the other cores to the daemon's I/O and the subscriber")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="the daemon's crash-safety checkpoint cadence (fts-daemon start --checkpoint-every; "
                        "default 1 as there); 0 measures the daemon without it: short runs hold 0-2 of its saves, "
                        "a long run spends at most --checkpoint-overhead (1%%) of its time on them")
    parser.add_argument("--epochs", type=int,
                        help="1. epochs timed per run, after the first two (default 4; 2 with --quick). The first "
                        "crash-safety checkpoint is written in the background during epochs 1-2 (113 MB for the large "
                        "model); more timed epochs weigh it as a longer run does")
    parser.add_argument("--windows", type=int, default=3, metavar="RUNS",
                        help="daemon runs for the same-run window measurement (1b.; 0 skips it)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: events, bus, pairs")
    parser.add_argument("--window-scale", type=int, default=1,
                        help="1b. windows this many times longer (and their untimed start too)")
    parser.add_argument("--no-subscriber", action="store_true",
                        help="1b. without the subscriber process (what the daemon's own threads cost)")
    parser.add_argument("--subscriber-idle", action="store_true",
                        help="1b. the subscriber process under SCHED_IDLE (Linux): it runs when a core would otherwise "
                        "idle, and any woken training thread preempts it")
    parser.add_argument("--subscriber-kinds", metavar="KINDS",
                        help="the subscriber subscribes to these event kinds only (comma-separated, e.g. "
                        "state,schedule,transition,edit,log,heartbeat: connected, but no per-step lr or metric data "
                        "reaches it; the most any batching of the stream could save on the subscriber's side)")
    parser.add_argument("--hooks-only", action="store_true",
                        help="1b. with lr and metric events dropped as EventBus.publish receives them: what the tap's "
                        "hooks cost the training thread by themselves (use with --no-subscriber)")
    parser.add_argument("--batch-ms", type=float, help="the daemon's shortest time between two batches of events "
                        "(StartOptions.batch_ms, default 100)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--subscriber", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=30.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        subscriber(args.subscriber, args.expect or None, args.idle)
        return 0
    warnings.filterwarnings("ignore")
    import pytorch_lightning  # noqa: F401 - it sets its loggers' levels on import; quiet them after

    for name in ("pytorch_lightning", "lightning_fabric", "fts_daemon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_ms is not None:
        DAEMON_OPTIONS["batch_ms"] = args.batch_ms
    if args.hooks_only:
        drop_lossy_events()
    if args.subscriber_idle:
        os.environ["FTS_BENCH_SUBSCRIBER_IDLE"] = "1"  # the subscriber processes inherit it
    if args.subscriber_kinds:
        unknown = set(args.subscriber_kinds.split(",")) - set(ev.KINDS)
        if unknown:
            parser.error(f"--subscriber-kinds: unknown kinds {sorted(unknown)} (known: {', '.join(ev.KINDS)})")
        os.environ["FTS_BENCH_SUBSCRIBER_KINDS"] = args.subscriber_kinds
    pairs = args.pairs or (3 if args.quick else 8)
    results: dict[str, Any] = {}

    skip = set(filter(None, args.skip.split(",")))
    if "events" not in skip:
        print("3. per-event cost on the training thread (us/event, 8-group lr event)", flush=True)
        results["per_event_us"] = per_event_cost(50_000 if args.quick else 200_000)
        for k, v in results["per_event_us"].items():
            print(f"  {k:32} {v:7.2f}")

    if "bus" not in skip:
        print("2. bus throughput to one subscriber process", flush=True)
        rates = [2_000, 10_000, 20_000] if args.quick else [2_000, 10_000, 20_000, 40_000, 60_000, 80_000]
        results["bus"] = bus_throughput(rates, 1.0 if args.quick else 2.0)
        for r in results["bus"]["paced"]:
            print(f"  offered {r['offered_rate']:>8,.0f}/s: received {r['received']:>8,} at {r['received_rate']:>9,.0f}/s, "
                  f"lost {r['lost']}")
        b = results["bus"]["burst"]
        print(f"  unpaced burst: {b['events']:,} published in {b['publish_seconds']:.2f}s, received {b['received']:,} "
              f"({b['received_rate']:,.0f}/s), lost {b['lost']:,} ({b['dropped_in_queue']:,} at the bounded queue)")
        print(f"  max lossless rate: {results['bus']['max_lossless_rate']:,.0f} events/s")

    if "pairs" not in skip:
        print("1. training steps/s: daemon with a live subscriber vs plain Lightning (target ratio >= 0.98); "
              f"torch intra-op threads {torch.get_num_threads()} on {os.cpu_count()} cores; crash-safety checkpoint "
              f"every {args.checkpoint_every} epoch(s) (0: none)"
              + (f"; the subscriber takes {args.subscriber_kinds} events only" if args.subscriber_kinds else ""),
              flush=True)
        results["training"] = training(pairs, args.sizes.split(","), epochs=STEADY_FROM + (args.epochs or (2 if args.quick else 4)),
                                       checkpoint_every=args.checkpoint_every)
        for size, r in results["training"].items():
            extra = r["train_thread_cpu_us_per_step_daemon"] - r["train_thread_cpu_us_per_step_plain"]
            print(f"  {size:6} plain {r['plain_steps_per_s']:7.1f} steps/s  daemon {r['daemon_steps_per_s']:7.1f} steps/s  "
                  f"ratio: median of pairs {r['ratio_median']:.3f} (95% interval {r['ratio_interval'][0]:.3f}-"
                  f"{r['ratio_interval'][1]:.3f}), best vs best {r['ratio_best']:.3f}; "
                  f"+{r['added_us_per_step']:.0f} us per step; "
                  f"training thread +{extra:.0f} us/step CPU; I/O thread CPU {100 * r['io_thread_cpu_share']:.1f}% of "
                  f"the run's time; subscriber lost {r['subscriber_lost']} events")
    if args.windows:
        how = "no subscriber" if args.no_subscriber else "the subscriber live throughout"
        if args.subscriber_idle and not args.no_subscriber:
            how += ", under SCHED_IDLE"
        if args.subscriber_kinds and not args.no_subscriber:
            how += f", subscribed to {args.subscriber_kinds} only"
        if args.hooks_only:
            how += "; lr and metric events dropped as publish receives them: the tap's hooks alone"
        print(f"1b. the event stream's per-step cost within one daemon run: windows with the stream on vs off ({how})",
              flush=True)
        # (steps per window, untimed steps at its start): windows of ~0.4-0.7 s on this VM, the first third untimed,
        # which must outlast a batch (batch_ms, 100) and the subscriber's backlog: ~130, 130 and 240 ms
        results["windows"] = windows(args.sizes.split(","), args.windows, epochs=3 if args.quick else 6,
                                     window_steps={k: (w * args.window_scale, g * args.window_scale) for k, (w, g) in
                                                   {"tiny": (192, 64), "large": (48, 16), "xl": (12, 4)}.items()},
                                     subscribe=not args.no_subscriber)
        for size, r in results["windows"].items():
            print(f"  {size:6} steps/s with the stream / without, same run: {r['ratio_median']:.3f} (median of "
                  f"{r['windows']} pairs of neighbouring windows of {r['window_steps']} steps, its 95% interval {r['interval'][0]:.3f}-"
                  f"{r['interval'][1]:.3f}; off windows deviate from those two away by {100 * r['noise']:.1f}%, "
                  f"median off / off {r['null']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
