"""Subscribers must never slow training: churn (100 attach/detach cycles) and a subscriber frozen for 60 s.

All runs train the same tiny model (300 steps per epoch, phase 2 from step 600) in their own process with
``OMP_NUM_THREADS=1``, until the test stops them, and are measured in phase 2 (the costliest steps) from the ``lr``
events' timestamps. Two figures each: wall-clock steps/s (what the goal is stated in, but moved by anything else the
2-core machine runs, the client included), and steps per CPU-second of the daemon process (its own cost: the I/O
thread answering snapshots, the GIL it takes from the training thread), which leaves the client's own CPU out (the
host's drift moves both figures; the short neighbouring spans below cancel it).

* *Churn*: in each of three daemon runs, a client attaches (subscribes, asks ``snapshot`` with packed series as the
  TUI does, reads 10 events, which takes ~0.1-0.2 s as events go out in 100 ms batches) and detaches, 100 times,
  with 0.1 s spans without a client between the cycles. Each cycle's span is compared with the quiet spans on
  either side of it, within the same process: separate processes of the same config differ by several percent in
  speed by themselves, and one process's speed drifts by up to ~30% over seconds on a shared VM, mostly slowly,
  which neighbouring spans a tenth of a second long cancel. (Fixed windows of 0.32 s with 4 cycles each gave 75
  comparisons, and with no client at all their median strayed by ~2% from 1; 2 s windows, 8 comparisons,
  ±3%.) Epochs are 1000 steps long, and a span holding an epoch's end (validation, a checkpoint) is left out with
  its comparisons. The quiet spans' deviation from their neighbours, and the same runs with a client that only
  sleeps as long as a cycle (``FTS_CHURN_CLIENT=none``), show the noise. ``FTS_CHURN_CLIENT`` takes a cycle apart:
  ``subscribe`` (SUB only, 20 events), ``snapshot`` (the control request only), ``snapshot-undecoded`` (the same,
  the reply left undecoded); ``follow-lists`` and ``snapshot-lists`` ask for the series as JSON lists instead.
* *Stalled subscriber*: a subscriber process (``tests/reliability_subscriber.py``, ZeroMQ's default receive
  high-water mark) is stopped with SIGSTOP for 60 s while training goes on, then continued. Its queues overflow (a
  test callback adds 5 ``log`` events per step so that they do on a slow machine too), it sees the ``seq`` gap,
  snapshots again, and at the end its rebuilt state equals ``events.jsonl`` exactly. For that comparison the daemon
  keeps every point (``--history``), so this run is paced (2 ms sleep per step, 3 LR groups in phase 2) to keep the
  full-history snapshot under the protocol's 4 MiB frame limit. The freeze is compared with the 30 s before and
  after it, and training must never pause for it. One process's speed moves by 5-10% between such windows on a
  shared VM, so a *twin* run of the same config trains beside it, followed by a subscriber that is never stopped:
  the host moves both alike, and the freeze's effect is the stalled run's during/sides ratio over the twin's. With
  nothing frozen, that ratio of ratios deviated from 1 by a median 0.6-0.8% and at most 3.3%, where one run alone
  deviated by 6-11% (``bench/twin_noise.py``, three recordings).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq

from fts_daemon import events as ev
from fts_daemon.client import Control, Follower

from .daemon_support import SCHEDULE, wait_for, write_config
from .reliability_support import REPO, DaemonProcess, cpu_seconds, env_for, figure, read_event_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS_PER_EPOCH = 300
PHASE2_STEP = 2 * STEPS_PER_EPOCH + 100  # measurements start here, in phase 2
CHURN_STEPS_PER_EPOCH = 1000  # few epoch ends among the churn runs' short windows
CYCLES = 100  # per run
CHURN_RUNS = 3
# the quiet span after each cycle (cycles themselves last ~0.1-0.2 s: they wait for the daemon's next batch of
# events), and the pause before it that a detach gets to finish in the daemon; FTS_CHURN_GAP_S changes the first
GAP_S = float(os.environ.get("FTS_CHURN_GAP_S", "0.1"))
SETTLE_S = 0.02
# what a churn cycle does (see the module docstring): "follow" is the test; "none" measures the method's own noise
CHURN_CLIENT = os.environ.get("FTS_CHURN_CLIENT", "follow")
STALL_S = 60.0
SIDE_S = 30.0


def schedule() -> dict[int, dict[str, Any]]:
    sched = copy.deepcopy(SCHEDULE)
    sched[0]["max_transition_epoch"] = 1
    sched[1]["max_transition_epoch"] = 2
    return sched


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("subs")
    runtime = base / "rt"
    runtime.mkdir(mode=0o700)
    env = env_for(runtime, OMP_NUM_THREADS="1")
    # runs until stopped: each run is measured over its own window, then stopped
    cfg = write_config(base / "cfg", schedule(), max_epochs=1000, num_train=32 * CHURN_STEPS_PER_EPOCH, name="tp")
    return {"base": base, "env": env, "cfg": cfg, "n": 0}


class Mark:
    """A point in time of a daemon: wall clock and the CPU time its process had used by then."""

    def __init__(self, pid: int):
        self.t, self.cpu, self.main_cpu = time.time(), cpu_seconds(pid), cpu_seconds(pid, main_thread_only=True)

    def background_per_s(self, later: Mark) -> float:
        """CPU seconds per second the process's other threads (I/O, ZeroMQ, writers) used until ``later``."""
        if None in (self.cpu, self.main_cpu, later.cpu, later.main_cpu):
            return math.nan
        return ((later.cpu - later.main_cpu) - (self.cpu - self.main_cpu)) / (later.t - self.t)


def window_rate(events: list[ev.Event], a: Mark, b: Mark) -> tuple[float, float]:
    """(steps per second, steps per CPU-second of the daemon process) between two marks, from the ``lr`` events.

    The second is what a subscriber can cost the daemon (its I/O thread's work, GIL taken from training), leaving the
    client's own CPU out; NaN where /proc is unavailable."""
    inside = [(e.ts, e.step) for e in events if e.kind == ev.LR and a.t <= e.ts <= b.t]
    steps = inside[-1][1] - inside[0][1]
    per_cpu = steps / (b.cpu - a.cpu) if a.cpu is not None and b.cpu is not None else float("nan")
    return steps / (inside[-1][0] - inside[0][0]), per_cpu


def in_epoch_rate(events: list[ev.Event], a: Mark, b: Mark) -> float:
    """Steps per second between two marks, counting only intervals between consecutive steps of one epoch (NaN if
    there are none)."""
    inside = [(e.ts, e.step, e.epoch) for e in events if e.kind == ev.LR and a.t <= e.ts <= b.t]
    steps, seconds = 0, 0.0
    for (t0, s0, e0), (t1, s1, e1) in zip(inside, inside[1:]):
        if e0 == e1 and s1 == s0 + 1:
            steps, seconds = steps + 1, seconds + (t1 - t0)
    return steps / seconds if seconds > 0 else math.nan


def one_epoch(events: list[ev.Event], a: Mark, b: Mark) -> bool:
    """Whether the steps between two marks, and the step right after them, all belong to one epoch."""
    lr = [e for e in events if e.kind == ev.LR and e.ts >= a.t]
    inside = [e.epoch for e in lr if e.ts <= b.t]
    after = [e.epoch for e in lr if e.ts > b.t][:1]
    return bool(inside) and len(set(inside + after)) == 1


def churn_cycle(rec: Any) -> None:
    """One attach/detach cycle of the CHURN_CLIENT kind."""
    if CHURN_CLIENT in ("follow", "follow-lists"):
        # "follow" asks for packed series, as the TUI does; "follow-lists" for the JSON lists a script would
        series = "packed" if CHURN_CLIENT == "follow" else "lists"
        with Follower(rec.pub, rec.ctl, series=series) as follower:
            got = 0
            for kind, _ in follower.follow(timeout=5):
                got += kind == "event"
                if got >= 10:
                    break
    elif CHURN_CLIENT == "subscribe":
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, ev.TOPIC_PREFIX.encode())
        sub.connect(rec.pub)
        for _ in range(20):
            if not sub.poll(5000):
                raise TimeoutError("no event within 5 s")
            sub.recv_multipart()
        sub.close(0)
    elif CHURN_CLIENT == "snapshot":
        with Control(rec.ctl) as ctl:
            ev.unpack_snapshot_series(ctl.request("snapshot", series="packed"))
    elif CHURN_CLIENT == "snapshot-lists":
        with Control(rec.ctl) as ctl:
            ctl.request("snapshot")
    elif CHURN_CLIENT == "snapshot-undecoded":
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(rec.ctl)
        dealer.send(ev.request("snapshot", 1, series="packed"))
        if not dealer.poll(5000):
            raise TimeoutError("no snapshot reply within 5 s")
        dealer.recv()
        dealer.close(0)
    elif CHURN_CLIENT == "none":
        time.sleep(0.15)  # as long as a cycle: the method's noise with windows of the same length
    else:
        raise ValueError(f"FTS_CHURN_CLIENT={CHURN_CLIENT!r}: follow, follow-lists, subscribe, snapshot, "
                         "snapshot-lists, snapshot-undecoded or none")


def churn_run(setup: dict[str, Any]) -> dict[str, Any]:
    """One daemon run: a quiet span, then CYCLES times: a cycle, a short pause, a quiet span."""
    setup["n"] += 1
    name = f"tp{setup['n']}"
    proc = DaemonProcess.start(name, setup["base"] / name, setup["env"], config=setup["cfg"])
    errors: list[str] = []
    windows: list[tuple[Mark, Mark]] = []  # quiet, cycle, quiet, ..., cycle, quiet
    try:
        rec = proc.record()
        with Control(rec.ctl, timeout=30) as ctl:
            wait_for(lambda: (ctl.request("hello")["step"] or 0) >= PHASE2_STEP, timeout=180, interval=0.05)
            start = Mark(proc.pid)
            time.sleep(GAP_S)
            windows.append((start, Mark(proc.pid)))
            for _ in range(CYCLES):
                start = Mark(proc.pid)
                try:
                    churn_cycle(rec)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    errors.append(repr(err))
                windows.append((start, Mark(proc.pid)))
                time.sleep(SETTLE_S)
                start = Mark(proc.pid)
                time.sleep(GAP_S)
                windows.append((start, Mark(proc.pid)))
            ctl.request("stop")
        rc = proc.wait(120)
    finally:
        proc.ensure_dead()
    events = read_event_file(setup["base"] / name / "events.jsonl").events
    final = [e for e in events if e.kind == ev.STATE][-1].data
    logged_errors = [e.data["message"] for e in events if e.kind == ev.LOG and e.data["level"] == "error"]
    rates = [in_epoch_rate(events, a, b) for a, b in windows]
    # no epoch end inside (nor right after), and at least one step interval
    clean = [one_epoch(events, a, b) and r == r for (a, b), r in zip(windows, rates)]

    def vs_neighbours(i: int, d: int = 1) -> float | None:
        if not (clean[i] and clean[i - d] and clean[i + d]):
            return None
        return rates[i] / statistics.mean([rates[i - d], rates[i + d]])

    def kept(values: list[float | None]) -> list[float]:
        return [v for v in values if v is not None]

    def steps_per_cpu(at: range) -> float:
        """Steps per CPU-second of the daemon summed over the clean windows ``at`` (/proc counts CPU time in
        10 ms ticks: one window's share is too coarse, a sum over a hundred is not)."""
        steps = cpu = 0.0
        for i in at:
            a, b = windows[i]
            inside = [e.step for e in events if e.kind == ev.LR and a.t <= e.ts <= b.t]
            if clean[i] and a.cpu is not None and b.cpu is not None:
                steps, cpu = steps + inside[-1] - inside[0], cpu + b.cpu - a.cpu
        return steps / cpu if cpu else math.nan

    cycles_at, quiet_at = range(1, len(windows), 2), range(0, len(windows), 2)
    return {
        "rc": rc, "final": final, "cycles": len(cycles_at), "errors": errors, "logged_errors": logged_errors,
        "ratios": kept([vs_neighbours(i) for i in cycles_at]),
        "cpu_ratio": steps_per_cpu(cycles_at) / steps_per_cpu(quiet_at),
        # the noise: a quiet span against the quiet spans on either side of it (two places away)
        "quiet_ratios": kept([vs_neighbours(i, 2) for i in range(2, len(windows) - 2, 2)]),
        "cycle_s": statistics.median(b.t - a.t for a, b in (windows[i] for i in cycles_at)),
        "seconds": windows[-1][1].t - windows[0][0].t,
    }


@pytest.fixture(scope="module")
def churn_runs(setup: dict[str, Any]) -> list[dict[str, Any]]:
    return [churn_run(setup) for _ in range(CHURN_RUNS)]


def test_subscriber_churn_does_not_slow_training(churn_runs: list[dict[str, Any]]) -> None:
    for r in churn_runs:
        assert r["rc"] == 0 and r["final"]["reason"] == "stopped" and not r["logged_errors"]
        assert r["cycles"] == CYCLES and not r["errors"], r["errors"]
    ratios = [x for r in churn_runs for x in r["ratios"]]
    ratio = statistics.median(ratios)
    noise = statistics.median(abs(x - 1) for r in churn_runs for x in r["quiet_ratios"])
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in churn_runs)
    per_s = CYCLES * len(churn_runs) / sum(r["seconds"] for r in churn_runs)
    # the median's own spread: its 95% interval from the order statistics (a distribution-free interval)
    ordered, half = sorted(ratios), 0.98 * len(ratios) ** 0.5
    low = ordered[max(0, int(len(ratios) / 2 - half))]
    high = ordered[min(len(ratios) - 1, int(len(ratios) / 2 + half))]
    kind = "" if CHURN_CLIENT == "follow" else f"; cycles: {CHURN_CLIENT}"
    figure("subscriber-churn",
           f"{CYCLES} attach/detach cycles x {len(churn_runs)} runs ({per_s:.1f}/s, each cycle "
           f"~{statistics.median(r['cycle_s'] for r in churn_runs):.2f}s between {GAP_S:g}s spans without a client"
           f"{kind}), no training error; steps/s during a cycle / the spans beside it = {ratio:.3f} (goal >= 0.98; "
           f"median of {len(ratios)} of {CYCLES * len(churn_runs)} cycles, the rest held an epoch end; 95% interval "
           f"of the median {low:.3f}-{high:.3f}; spans without a client deviate from theirs by {noise:.1%}); steps "
           f"per CPU-second of the daemon during cycles / between them = {cpu_ratio:.3f}; load average "
           f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", ratio=ratio, noise=noise, cpu_ratio=cpu_ratio,
           ratios=ratios, median_low=low, median_high=high)
    # The goal is 2% of wall-clock steps/s. The client shares the 2 cores with the daemon, and so does whatever else
    # runs on the machine (other test runs, benchmarks): the bounds only catch gross regressions (a snapshot
    # stalling training, a send that blocks), and the figure above says how close to the goal this run came.
    assert ratio >= 0.7
    assert not cpu_ratio < 0.8  # NaN (no /proc): not measured


def stall_config(directory: Path) -> Path:
    """The tiny config paced by a 2 ms sleep per step, without the no-decay split (3 groups in phase 2)."""
    sched = schedule()
    sched[1]["new_lr_scheduler"]["init_pg_lrs"] = [2.0e-3, 3.0e-3]
    sched[2]["new_lr_scheduler"]["init_pg_lrs"] = [1.0e-3, 2.0e-3, 2.0e-3]
    cfg = write_config(directory, sched, step_delay=0.002, max_epochs=1000, num_train=32 * STEPS_PER_EPOCH, name="st")
    data = yaml.safe_load(cfg.read_text())
    del data["model"]["init_args"]["no_decay"]
    # 5 `log` events per step: the frozen subscriber's queues overflow within seconds however slow the machine is
    # (snapshots keep only the last 200 logs, so this does not grow them)
    data["trainer"]["callbacks"].append({"class_path": "tests.reliability_probe.Chatter", "init_args": {"per_step": 5}})
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


def rebuilt_equals_record(state: dict[str, Any], events: list[ev.Event]) -> tuple[bool, int]:
    """Whether a subscriber's rebuilt state equals ``events.jsonl`` exactly; and the number of LR points."""
    durable: dict[str, dict[str, float]] = {}
    edits = {}
    for e in events:
        if e.kind == ev.LR:
            for tag, value in e.data["lrs"].items():
                durable.setdefault(tag, {})[str(e.step)] = value
        elif e.kind == ev.EDIT and e.data["edit"].get("id"):
            edits[str(e.data["edit"]["id"])] = e.data["edit"]["status"]
    transitions = [e.data["to"] for e in events if e.kind == ev.TRANSITION]
    exact = (state["lr"] == durable and state["edits"] == edits and state["transitions"] == transitions
             and state["state"] == "finished" and state["seq"] == events[-1].seq)
    return exact, sum(len(v) for v in durable.values())


def test_stalled_subscriber_is_detected_and_resyncs_exactly(setup: dict[str, Any]) -> None:
    base, env = setup["base"], setup["env"]
    cfg = stall_config(base / "cfg-stall")
    # "stall" has its subscriber frozen; "twin", the same run started beside it, keeps its subscriber reading (see
    # the module docstring)
    names = ("stall", "twin")
    procs = {n: DaemonProcess.start(n, base / n, env, config=cfg, extra=["--history", "10000000"]) for n in names}
    outs = {n: base / f"{n}-subscriber.json" for n in names}
    subs: dict[str, subprocess.Popen] = {}
    marks: dict[str, list[Mark]] = {n: [] for n in names}
    io: list[dict[str, Any]] = []  # the stall daemon's I/O thread's CPU time and events sent, at each mark
    try:
        recs = {n: procs[n].record() for n in names}
        with Control(recs["stall"].ctl, timeout=20) as ctl, Control(recs["twin"].ctl, timeout=20) as twin_ctl:
            controls = {"stall": ctl, "twin": twin_ctl}
            for n in names:
                wait_for(lambda n=n: (controls[n].request("hello")["step"] or 0) >= PHASE2_STEP, timeout=180,
                         interval=0.05)
            for n in names:
                subs[n] = subprocess.Popen(
                    [sys.executable, "-m", "tests.reliability_subscriber", recs[n].pub, recs[n].ctl, str(outs[n])],
                    cwd=REPO, env=env)
            for n in names:
                wait_for(lambda n=n: outs[n].with_suffix(".ready").exists(), timeout=60)

            def mark() -> None:
                io.append(ctl.request("hello")["stats"])
                for n in names:
                    marks[n].append(Mark(procs[n].pid))

            mark()
            time.sleep(SIDE_S)
            mark()
            subs["stall"].send_signal(signal.SIGSTOP)
            time.sleep(STALL_S)
            mark()
            subs["stall"].send_signal(signal.SIGCONT)
            time.sleep(SIDE_S)
            mark()
            for n in names:
                controls[n].request("stop")
        for n in names:
            assert procs[n].wait(120) == 0
            assert subs[n].wait(120) == 0
    finally:
        for sub in subs.values():
            if sub.poll() is None:
                sub.send_signal(signal.SIGCONT)
                sub.kill()
        for proc in procs.values():
            proc.ensure_dead()
    events = {n: read_event_file(base / n / "events.jsonl").events for n in names}
    # (steps/s, steps per CPU-second) before, during and after the freeze, for each run
    rates = {n: [window_rate(events[n], a, b) for a, b in zip(marks[n], marks[n][1:])] for n in names}
    (before, _), (during, _), (after, _) = rates["stall"]

    def during_vs_sides(n: str, i: int) -> float:
        """Run ``n``'s figure ``i`` (0: steps/s, 1: steps per CPU-second) during the freeze / the mean of the sides."""
        return rates[n][1][i] / statistics.mean([rates[n][0][i], rates[n][2][i]])

    sides = statistics.mean([before, after])
    vs_twin = during_vs_sides("stall", 0) / during_vs_sides("twin", 0)
    # the VM's CPU accounting moves with the host too (a CPU-second buys fewer steps when the host is busy)
    cpu_vs_twin = during_vs_sides("stall", 1) / during_vs_sides("twin", 1)
    m_before, m_stop, m_cont, m_end = marks["stall"]
    frozen_ts = [e.ts for e in events["stall"] if e.kind == ev.LR and m_stop.t <= e.ts <= m_cont.t]
    longest_pause = max(b - a for a, b in zip(frozen_ts, frozen_ts[1:]))
    state = json.loads(outs["stall"].read_text())
    exact, points = rebuilt_equals_record(state, events["stall"])
    twin_exact, _ = rebuilt_equals_record(json.loads(outs["twin"].read_text()), events["twin"])
    resync_delay = min((t for t in state["resyncs"] if t > m_cont.t), default=float("nan")) - m_cont.t
    # what the bus did per event sent, before / during / after the freeze: a frozen peer must cost it nothing more
    # (its PUB pipe fills up, then sends to it are dropped); unlike steps/s, not moved by the client's own CPU
    io_us = [(b["io_cpu_s"] - a["io_cpu_s"]) / max(1, b["published"] - a["published"]) * 1e6 for a, b in zip(io, io[1:])]
    figure("stalled-subscriber",
           f"SIGSTOP {STALL_S:.0f}s: steps/s during the freeze / the {SIDE_S:.0f}s before and after it "
           f"= {during / sides:.3f}, relative to the same ratio of a twin run beside it whose subscriber kept reading "
           f"= {vs_twin:.3f} (goal >= 0.98; alone: / before {during / before:.3f}, / after {during / after:.3f}, "
           f"twin {during_vs_sides('twin', 0):.3f}; {during:.0f}, {before:.0f}, {after:.0f} steps/s); "
           f"steps per CPU-second of the daemon during / sides = {during_vs_sides('stall', 1):.3f}, relative to the "
           f"twin's = {cpu_vs_twin:.3f}; the daemon's I/O thread {io_us[0]:.0f} / {io_us[1]:.0f} / {io_us[2]:.0f} "
           f"us of CPU per event sent before / during / after, all its threads but training's "
           f"{m_before.background_per_s(m_stop):.1%} / {m_stop.background_per_s(m_cont):.1%} / "
           f"{m_cont.background_per_s(m_end):.1%} of a core; "
           f"longest pause between steps while frozen {longest_pause * 1000:.0f} ms; "
           f"gaps detected {state['gaps']}, snapshots {state['snapshots']}, resynced {resync_delay:.2f}s after "
           f"SIGCONT; rebuilt state {'equals' if exact else 'DIFFERS from'} events.jsonl ({points} LR points; the "
           f"twin's subscriber: {'equal' if twin_exact else 'DIFFERS'})",
           during_vs_sides=during / sides, during_vs_twin=vs_twin, during_vs_before=during / before,
           during_vs_after=during / after, gaps=state["gaps"], cpu_during_vs_twin=cpu_vs_twin,
           io_us_per_event=io_us)
    assert state["gaps"] >= 1 and state["snapshots"] >= 2
    assert io_us[1] < 2 * io_us[0] + 20, io_us  # gross regressions only (a send retried, a spin): the VM moves it ±30%
    assert exact and twin_exact
    # goal: 2% of wall-clock steps/s. Against the twin the method's noise is about ±1-3% (other load on the 2 cores
    # moves the two runs not quite alike): the bound catches gross slowdowns, the figure says how close this run came
    assert vs_twin >= 0.9
    assert during / sides >= 0.7
    assert not cpu_vs_twin < 0.9  # NaN (no /proc): not measured
    assert longest_pause < 2.0
