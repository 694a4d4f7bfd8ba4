"""The TUI's pure run-state model, fed from recorded event streams (no Textual, no sockets)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fts_daemon.bus import RunHistory
from fts_daemon.events import Event, ProtocolError
from fts_tui import plot
from fts_tui.plot import ChartSpec, Marker, Trace, live_axis_end, render_chart
from fts_tui.replay import read_events
from fts_tui.series import Series
from fts_tui.state import LR, PLAN, PLAN_CHART_POINTS, PLANNING, SCHEDULE, PlanData, RunState, summarize_params
from fts_tui.views import header_lines, lr_chart, metric_chart
from tests.data.make_recordings import build_run, plan_for
from tests.test_tui_app import MID_RUN

DATA = Path(__file__).resolve().parent / "data"
DEMO = DATA / "demo_run"
CRASHED = DATA / "crashed_run"
TAG = "Explicit_Reinit_LR_Scheduler/phase{}"


def replayed(path: Path = DEMO) -> RunState:
    state = RunState(tolerant=True)
    events, _ = read_events(path)
    state.load_events(events)
    return state


def daemon_snapshot(events: list[Event], series: str = "lists", **history_kw: int) -> dict:
    """What the real daemon's ``snapshot`` op returns after ``events`` (its own RunHistory folds them)."""
    history = RunHistory(**history_kw)
    for e in events:
        history.ingest(e)
    last = events[-1]
    return {
        "protocol": 1,
        "run": last.run,
        "daemon": last.daemon,
        "seq": last.seq,
        "pub": "tcp://127.0.0.1:1",
        "ctl": "tcp://127.0.0.1:2",
        "model": "SentimentMiniLM",
        **json.loads(history.snapshot_json(series=series)),  # as it comes off the wire
    }


def test_recordings_are_what_the_generator_writes() -> None:
    # the committed files must match the generator (regenerate with `python tests/data/make_recordings.py`)
    events, report = read_events(DEMO)
    assert [e.to_dict() for e in events] == [e.to_dict() for e in build_run()]
    assert report.events == len(events) and not report.torn_tail and not report.bad_lines


def test_replay_finished_run() -> None:
    s = replayed()
    assert (s.run, s.status, s.phase, s.max_depth, s.n_phases) == ("demo-explicit-reinit", "finished", 3, 3, 4)
    assert (s.epoch, s.step) == (13, 560)
    assert s.info["model"] == "SentimentMiniLM"
    assert list(s.lr) == [TAG.format(i) for i in range(4)]
    assert len(s.lr[TAG.format(0)]) == 560 and len(s.lr[TAG.format(3)]) == 160
    assert s.lr[TAG.format(3)].last_y == pytest.approx(5e-06 * 0.8**3)
    assert [(t.from_phase, t.to_phase, t.epoch, t.step, t.reason) for t in s.transitions] == [
        (0, 1, 4, 160, "epoch_limit"),
        (1, 2, 7, 280, "epoch_limit"),
        (2, 3, 10, 400, "early_stopping"),
    ]
    assert {e.id: (e.status, e.applied_step) for e in s.edits.values()} == {"e1": ("applied", 400), "e2": ("cancelled", None)}
    assert s.pending_edits() == []
    assert [p.state for p in s.phases] == ["done", "done", "done", "current"]
    assert s.phases[3].lr == 5e-06  # the applied edit is in the schedule
    assert s.steps_per_second() == pytest.approx(16.2, abs=1.5)  # 20 steps/s minus validation pauses
    assert s.metric_names() == ["train_loss", "val_acc", "val_loss"]
    assert s.metric_stage == {"train_loss": "train", "val_loss": "val", "val_acc": "val"}


def test_replay_log_tells_the_story() -> None:
    texts = [(e.kind, e.text) for e in replayed().log]
    assert ("transition", "phase 0 → 1 at epoch 4, step 160 (epoch limit)") in texts
    assert ("scheduler", "scheduler reinitialized: StepLR(step_size=1, gamma=0.7), init_pg_lrs [2e-06]") in texts
    assert ("transition", "phase 2 → 3 at epoch 10, step 400 (early stopping)") in texts
    assert any(k == "edit" and t.startswith("edit e1 for phase 3 applied at step 400") for k, t in texts)
    assert ("edit", "edit e2 for phase 3 cancelled") in texts
    assert ("state", "run finished") == texts[-1]
    levels = {e.level for e in replayed().log}
    assert "warning" in levels


def test_replay_crashed_run_with_torn_tail() -> None:
    events, report = read_events(CRASHED)
    assert report.torn_tail and not report.bad_lines
    s = RunState(tolerant=True)
    s.load_events(events)
    assert s.status == "failed" and "CUDA out of memory" in (s.error or "")
    assert s.phase == 2 and s.step == 332
    assert [e.status for e in s.edits.values()] == ["queued"]
    assert s.log[-1].level == "error" and s.log[-1].text.startswith("run failed: RuntimeError")
    assert not s.editable(3)  # a failed run takes no edits


def test_replay_skips_a_bad_line_in_the_middle(tmp_path: Path) -> None:
    lines = (DEMO / "events.jsonl").read_text().splitlines()
    lines[10] = '{"v": 1, "kind": "lr", "seq": garbage'
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    events, report = read_events(tmp_path)
    assert report.bad_lines == [11] and not report.torn_tail and len(events) == len(lines) - 1
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "nope")


def test_live_seq_rules() -> None:
    events = build_run()
    s = RunState()
    s.apply_snapshot(daemon_snapshot(events[:100]))
    assert s.last_seq == 100 and not s.needs_resync
    assert not s.apply(events[50])  # at or below the snapshot: stale
    assert s.apply(events[100]) and s.last_seq == 101
    assert not s.apply(events[100])  # duplicate
    assert not s.apply(events[105]) and s.needs_resync and "missed events 102..105" in s.resync_reason
    # the snapshot clears it; a restarted daemon (new id) asks for a resync again
    s.apply_snapshot(daemon_snapshot(events[:110]))
    assert not s.needs_resync
    other = Event(**{**events[110].__dict__, "daemon": "restarted", "seq": 1})
    assert not s.apply(other) and s.needs_resync and "daemon restarted" in s.resync_reason


def test_tolerant_replay_accepts_a_resumed_daemon_in_the_same_file() -> None:
    events = build_run()
    second = [Event(**{**e.__dict__, "daemon": "second", "seq": i + 1}) for i, e in enumerate(events[400:])]
    s = RunState(tolerant=True)
    assert s.load_events(events[:400] + second) == len(events)
    assert s.status == "finished" and not s.needs_resync


def test_snapshot_then_stream_equals_full_stream() -> None:
    """Late attach: the daemon's snapshot at seq N plus events > N gives the state the whole stream gives."""
    events = build_run()
    full = replayed()
    for cut in (5, 170, 333, 600):
        s = RunState()
        s.apply_snapshot(daemon_snapshot(events[:cut]))
        for e in events[max(cut - 20, 0) :]:  # the SUB queue held some the snapshot already covers
            s.apply(e)
        assert not s.needs_resync
        assert (s.status, s.phase, s.step, s.epoch, s.last_seq) == (full.status, full.phase, full.step, full.epoch, full.last_seq)
        assert list(s.lr) == list(full.lr)
        assert {t: v.last_y for t, v in s.lr.items()} == {t: v.last_y for t, v in full.lr.items()}
        assert {k: (e.status, e.applied_step) for k, e in s.edits.items()} == {
            k: (e.status, e.applied_step) for k, e in full.edits.items()
        }
        assert [(t.to_phase, t.step) for t in s.transitions] == [(t.to_phase, t.step) for t in full.transitions]
        assert s.metric_names() == full.metric_names()


def test_snapshot_alone_shows_the_run_so_far() -> None:
    events = build_run()
    s = RunState()
    s.apply_snapshot(daemon_snapshot(events[:500], max_points=50))  # phase 2; e1 queued, e2 queued then cancelled
    assert s.run == "demo-explicit-reinit" and s.status == "training" and s.phase == 2
    assert s.info["model"] == "SentimentMiniLM" and "pub" not in s.info
    assert [e.id for e in s.pending_edits(3)] == ["e1"] and s.edits["e2"].status == "cancelled"
    assert [t.to_phase for t in s.transitions] == [1, 2]
    assert 0 < len(s.lr[TAG.format(0)].xs) <= 51
    kinds = [e.kind for e in s.log]
    assert kinds.count("transition") == 2 and "edit" in kinds and "log" in kinds
    assert s.editable(3) and not s.editable(2) and not s.editable(1)


def test_a_finished_run_shows_its_average_rate_live_from_a_snapshot_and_in_the_header() -> None:
    import dataclasses

    events = build_run()
    finished = dataclasses.replace(events[-1], data={**events[-1].data, "train_steps": 560, "train_seconds": 40.0})
    live = RunState()
    live.load_events(events[:-1])
    window = live.steps_per_second()
    assert window is not None and window > 15  # still training: the last 10 s of steps
    live.apply(finished)
    assert live.steps_per_second() == pytest.approx(14.0)
    late = RunState()
    late.apply_snapshot(daemon_snapshot([*events[:-1], finished]))
    assert late.steps_per_second() == pytest.approx(14.0)
    text = "".join(cell for cell, _ in header_lines(late, now=finished.ts, source="live")[0])
    assert "14.0 steps/s avg" in text
    # a recording from before the daemon said how long training took keeps the window's rate, unlabelled
    old = replayed()
    assert old.run_rate is None and " steps/s avg" not in "".join(
        cell for cell, _ in header_lines(old, now=finished.ts, source="replay")[0])


def test_a_plan_request_beginning_or_ending_redraws_only_what_says_so() -> None:
    """The planning flag changes the LR chart's subtitle alone: the schedule table and LR chart are rebuilt for a
    new plan, not for each request (a long run's plan is asked again after every schedule change)."""
    state = RunState()
    state.take_dirty()
    state.set_planning(True)
    assert state.planning and state.take_dirty() == {PLANNING}
    state.set_planning(True)
    assert state.take_dirty() == set()
    state.set_plan(plan_for())
    state.set_planning(False)
    assert state.take_dirty() == {PLAN, LR, SCHEDULE, PLANNING}


def test_refused_edit_is_logged_not_stored() -> None:
    s = replayed()
    ev = Event(kind="edit", seq=10_000, ts=0.0, run=s.run or "", daemon=s.daemon or "",
               data={"edit": {"id": None, "phase": 1, "changes": {"lr": 1}, "status": "rejected", "error": "phase 1 is already done"}})
    n = len(s.edits)
    assert s.apply(ev)
    assert len(s.edits) == n
    assert s.log[-1].level == "error" and s.log[-1].text == "edit for phase 1 rejected: phase 1 is already done"


def test_stale_queued_copy_never_undoes_a_final_status() -> None:
    s = replayed()
    from fts_tui.state import EditInfo

    s.store_edit(EditInfo(id="e1", phase=3, status="queued"))
    assert s.edits["e1"].status == "applied"


def test_unnamed_groups_follow_lightning_pg1_rename() -> None:
    s = RunState(tolerant=True)

    def lr(seq: int, lrs: dict) -> Event:
        return Event(kind="lr", seq=seq, ts=float(seq), run="r", daemon="d", data={"lrs": lrs}, step=seq)

    s.load_events([lr(1, {"lr-AdamW": 1.0}), lr(2, {"lr-AdamW": 0.5}), lr(3, {"lr-AdamW/pg1": 0.4, "lr-AdamW/pg2": 1e-5})])
    assert list(s.lr) == ["lr-AdamW/pg1", "lr-AdamW/pg2"]
    assert s.lr["lr-AdamW/pg1"].points() == ([1.0, 2.0, 3.0], [1.0, 0.5, 0.4])


def test_history_is_bounded() -> None:
    s = RunState(tolerant=True, series_capacity=256, log_limit=50)
    seq = 0
    for i in range(1, 20_001):
        seq += 1
        s.apply(Event(kind="lr", seq=seq, ts=i / 100, run="r", daemon="d", data={"lrs": {"a": 1.0 / i, "b": float(i % 7)}}, step=i))
        if i % 100 == 0:
            seq += 1
            s.apply(Event(kind="log", seq=seq, ts=0, run="r", daemon="d", data={"level": "info", "message": "x"}))
    assert all(len(series.xs) <= 256 for series in s.lr.values())
    assert len(s.log) == 50 and s.log_total >= 100
    xs, ys = s.lr["b"].points()
    assert min(ys) == 0.0 and max(ys) == 6.0  # min/max decimation keeps the extremes
    assert xs == sorted(xs) and xs[-1] >= 19_990


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=3000))
def test_series_keeps_extremes_order_and_bound(values: list[float]) -> None:
    series = Series(capacity=64)
    for i, v in enumerate(values):
        series.append(float(i), v)
    xs, ys = series.points()
    assert len(series.xs) < 64 + 2
    assert min(ys) == min(values) and max(ys) == max(values)
    assert xs == sorted(xs) and xs[-1] == len(values) - 1 or len(values) > 64
    assert series.last_y == values[-1] and series.count == len(values)
    assert set(zip(xs, ys)) <= set((float(i), v) for i, v in enumerate(values))


def test_planned_and_actual_starts_and_scheduler_in_force() -> None:
    s = replayed()
    assert s.planned_start_epoch(1) == (4, False) and s.actual_start_epoch(1) == 4
    assert s.planned_start_epoch(3) == (12, False) and s.actual_start_epoch(3) == 10
    assert s.scheduler_in_force(0) == ("LinearLR(start_factor=0.1, total_iters=4) (initial)", True)
    assert s.scheduler_in_force(2) == ("CosineAnnealingWarmRestarts(T_0=3, T_mult=2, eta_min=1e-07)", True)
    s.set_plan({"steps": [0, 1], "series": {"a": [1.0, None]}, "phase_starts": [{"phase": 0, "epoch": 0, "step": 0}, {"phase": 3, "epoch": 11, "step": 440}]})
    assert s.planned_start_epoch(3) == (11, False)
    assert math.isnan(s.plan.series["a"][1])


def test_phase_segments_align_at_phase_start() -> None:
    s = replayed()
    segments = s.phase_segments(s.metrics["train_loss"])
    assert [p for p, _, _ in segments] == [0, 1, 2, 3]
    assert all(xs[0] >= 0 and xs[0] < 5 for _, xs, _ in segments)


def test_summarize_params() -> None:
    assert summarize_params([]) == "0"
    assert summarize_params(["classifier.bias", "classifier.weight"]) == "2: classifier.bias, classifier.weight"
    names = [f"encoder.layer.{i}.output.dense.{w}" for i in range(4) for w in ("weight", "bias")]
    assert summarize_params(names, 80) == "8: encoder.layer.0.*, encoder.layer.1.*, encoder.layer.2.*, encoder.layer.3.*"
    assert len(summarize_params(names, 20)) == 20


def test_chart_rendering_shapes_markers_and_log_axis() -> None:
    trace = Trace("lr", [0, 1, 2, 3], [1e-5, 1e-6, 0.0, 1e-7])
    rows = render_chart(ChartSpec([trace], [Marker(2, "P1")], log_y=True, y_format="lr"), 40, 10)
    text = ["".join(t for t, _ in row) for row in rows]
    assert len(text) == 10 and all(len(line) == 40 for line in text)
    assert "P1" in text[0] and any("┊" in line for line in text[1:-1])
    top = float(text[1].split("┤")[0])
    assert 5e-6 < top < 2e-5  # the top row is labelled near the max, on a log axis (0.0 is left out)
    bottom = float(text[-2].split("┤")[0])
    assert 5e-8 < bottom < 2e-7
    assert text[-1].strip().startswith("step")
    empty = render_chart(ChartSpec(empty_text="no data yet"), 30, 6)
    assert any("no data yet" in "".join(t for t, _ in row) for row in empty)


def test_float64_extremes_are_drawn_at_the_chart_edges() -> None:
    """A metric logged as float64 can be as large as 1.7e308: the span between two such values is infinite, which
    made the pixel scale NaN and the chart raise. Values past ±1e300 are drawn at it."""
    for ys in ([-1.7e308, 1.7e308, 0.0], [1e308, 1.7e308, -1e308]):
        rows = render_chart(ChartSpec([Trace("m", [0, 1, 2], ys)]), 40, 10)
        text = ["".join(t for t, _ in row) for row in rows]
        top, bottom = text[1].split("┤"), text[-2].split("┤")  # text[0] holds the phase markers, [-1] the x axis
        assert float(top[0]) > 5e299 and float(bottom[0]) < -5e299
        assert top[1].strip() and bottom[1].strip()  # dots on the top and the bottom rows


def test_chart_x_max_cuts_the_traces_and_ends_the_axis_there() -> None:
    near = Trace("now", [0, 10, 20], [1.0, 2.0, 3.0])
    far = Trace("plan", [0, 50, 100, 150], [1.0, 100.0, 200.0, 300.0], dotted=True)
    markers = [Marker(60, "P1"), Marker(120, "P2")]
    rows = render_chart(ChartSpec([near, far], markers, x_max=80), 60, 10)
    text = ["".join(t for t, _ in row) for row in rows]
    assert text[-1].rstrip().endswith("80")  # the axis ends at x_max, not at the last point (150)
    assert "P1" in text[0] and "P2" not in text[0]  # a marker beyond the axis is not drawn
    assert float(text[1].split("┤")[0]) < 150  # the y range fits the points shown (100 at x=50), not 300
    whole = render_chart(ChartSpec([near, far], markers), 60, 10)
    assert "".join(t for t, _ in whole[-1]).rstrip().endswith("150") and "P2" in "".join(t for t, _ in whole[0])


def test_lr_chart_axis_ends_a_quarter_past_the_next_planned_transition() -> None:
    """A long plan would leave the steps run so far a sliver at the left: with the plan drawn, the LR chart's axis
    runs to a quarter past the next planned transition, and over the whole plan once none is ahead."""
    state = RunState()
    state.load_events(build_run()[:MID_RUN])  # phase 2 at step 374; phase 3 is planned to start at step 400
    long_plan = plan_for(steps_per_epoch=400)  # the same phases at ten times the steps: the run is ~4% in
    state.set_plan(long_plan)
    starts = {p["phase"]: p["step"] for p in state.plan.phase_starts}
    assert state.phase == 2 and state.step == 374 and starts[3] == 4000
    spec, _ = lr_chart(state, log_y=True, show_plan=True)
    assert spec.x_max == pytest.approx(4000 * 1.25)
    assert lr_chart(state, log_y=True, show_plan=False)[0].x_max is None  # no plan drawn: the run so far
    state.set_plan(plan_for())  # phase 3 at step 400, the plan ends at 559: a quarter past 400 is nearly its end
    assert lr_chart(state, log_y=True, show_plan=True)[0].x_max == pytest.approx(500)
    state.load_events(build_run()[MID_RUN:])  # finished in phase 3: no transition ahead
    assert lr_chart(state, log_y=True, show_plan=True)[0].x_max is None


def _trace_strategy() -> st.SearchStrategy[Trace]:
    """Traces as the charts get them (steps ascending, repeats allowed), long enough to be reduced, with values
    that are smooth, noisy, flat, or hold zeros, negatives and gaps (NaN, None) that must be drawn point by point."""
    value = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, 1e-7, 1e-3, 0.5]))
    odd = st.one_of(value, st.sampled_from([math.nan, math.inf, None]))

    @st.composite
    def trace(draw: st.DrawFn) -> Trace:
        n = draw(st.integers(plot.REDUCE_OVER + 1, 400))
        start = draw(st.integers(0, 10_000))
        steps = [start]
        for gap in draw(st.lists(st.integers(0, 40), min_size=n - 1, max_size=n - 1)):
            steps.append(steps[-1] + gap)
        kind = draw(st.sampled_from(["smooth", "noisy", "flat", "odd"]))
        if kind == "smooth":
            scale, period = draw(st.floats(1e-6, 1e2)), draw(st.integers(3, 60))
            ys = [scale * (1.5 + math.sin(i / period)) for i in range(n)]
        elif kind == "flat":
            ys = [draw(value)] * n
        else:
            ys = draw(st.lists(odd if kind == "odd" else value, min_size=n, max_size=n))
        return Trace("t", [float(x) for x in steps], ys, dotted=draw(st.booleans()))

    return trace()


@settings(max_examples=300, deadline=None)
@given(traces=st.lists(_trace_strategy(), min_size=1, max_size=3), log_y=st.booleans(),
       cut=st.one_of(st.none(), st.floats(0.2, 1.3)), width=st.integers(12, 120), height=st.integers(4, 30))
def test_long_traces_are_drawn_exactly_as_point_by_point(traces: list[Trace], log_y: bool, cut: float | None,
                                                         width: int, height: int) -> None:
    """A long trace is reduced to a few points per pixel column before drawing: the chart must be the very same as
    when every point is drawn (what each column spans, how neighbours join, the y range and its labels)."""
    last = max(t.xs[-1] for t in traces)
    spec = ChartSpec(traces, [Marker(traces[0].xs[len(traces[0].xs) // 2], "P1")], log_y=log_y,
                     x_max=None if cut is None else last * cut)
    reduced = render_chart(spec, width, height)
    kept = plot.REDUCE_OVER
    plot.REDUCE_OVER = 10**9  # every trace drawn point by point
    try:
        whole = render_chart(spec, width, height)
    finally:
        plot.REDUCE_OVER = kept
    assert reduced == whole


@settings(max_examples=150, deadline=None)
@given(data=st.data(), log_y=st.booleans(), width=st.integers(12, 100), height=st.integers(4, 24))
def test_a_chart_redrawn_frame_after_frame_equals_one_drawn_afresh(data: st.DataObject, log_y: bool, width: int,
                                                                    height: int) -> None:
    """The charts keep each long trace's pixel spans from one frame to the next and draw only its new points: frame
    after frame, as the traces grow, are decimated (a Series compacting), change their range (the y axis moves) or
    the axis ends elsewhere, the chart must equal one drawn from scratch."""
    kept: dict = {}
    steps = list(range(data.draw(st.integers(plot.REDUCE_OVER + 1, 300))))
    live = [0.5 + math.sin(i / 9) * 0.4 for i in steps]
    plan_x = [float(i) for i in range(0, 4000, 3)]
    plan_y = [0.2 + 0.1 * math.cos(i / 200) for i in plan_x]
    for _ in range(data.draw(st.integers(2, 6))):
        move = data.draw(st.sampled_from(["grow", "grow", "grow", "compact", "spike", "axis"]))
        x_max = None
        if move == "grow":
            for _ in range(data.draw(st.integers(0, 200))):
                steps.append(steps[-1] + data.draw(st.integers(0, 3)))
                live.append(max(1e-3, live[-1] + data.draw(st.floats(-0.02, 0.02))))
        elif move == "compact":  # every other point goes, as when a Series halves its storage
            steps, live = steps[::2], live[::2]
        elif move == "spike":
            live[-1] = data.draw(st.sampled_from([5.0, 1e-4]))
        else:
            x_max = float(data.draw(st.integers(steps[-1], 5000)))
        spec = ChartSpec([Trace("live", [float(x) for x in steps], list(live)), Trace("plan", plan_x, plan_y, dotted=True)],
                         log_y=log_y, x_max=x_max)
        assert render_chart(spec, width, height, kept) == render_chart(spec, width, height), move


def test_a_growing_axis_ends_at_a_round_value_past_the_newest_point() -> None:
    assert [live_axis_end(x) for x in (1, 7, 95, 101, 369, 1000, 1001, 20_345)] == [
        1, 7, 100, 110, 400, 1000, 1100, 22_000]
    assert live_axis_end(0) is None and live_axis_end(-5) is None and live_axis_end(math.nan) is None
    ends = [live_axis_end(float(x)) for x in range(1, 30_000, 7)]
    assert all(e is not None and x <= e <= 1.17 * x for x, e in zip(range(1, 30_000, 7), ends))
    assert len(set(ends)) < len(ends) / 50  # it stays put while the run grows: ~10% at a time


def test_charts_of_a_live_run_leave_room_to_grow_and_a_finished_one_ends_at_its_last_step() -> None:
    state = RunState()
    state.load_events(build_run()[:MID_RUN])
    state.set_connection("live")
    spec, _ = metric_chart(state, ["train_loss"], overlay=False)
    last = max(t.xs[-1] for t in spec.traces)
    assert spec.x_max == live_axis_end(last) and spec.x_max > last
    assert metric_chart(state, ["train_loss"], overlay=True)[0].x_max is not None
    assert lr_chart(state, log_y=True, show_plan=False)[0].x_max == live_axis_end(state.step)
    state.set_plan(plan_for())  # with the plan drawn, the axis runs past the next planned transition instead
    assert lr_chart(state, log_y=True, show_plan=True)[0].x_max == pytest.approx(500)
    state.set_connection("lost")  # nothing arrives: the axis ends at the newest point
    assert metric_chart(state, ["train_loss"], overlay=False)[0].x_max is None
    state.set_connection("live")
    state.load_events(build_run()[MID_RUN:-1])  # in the last phase, still running (the last event: finished)
    assert state.phase == 3 and not state.finished
    assert lr_chart(state, log_y=True, show_plan=True)[0].x_max is None  # the whole plan: it does not grow
    assert lr_chart(state, log_y=True, show_plan=False)[0].x_max == live_axis_end(state.step)
    state.load_events(build_run()[-1:])  # finished
    assert metric_chart(state, ["train_loss"], overlay=False)[0].x_max is None
    assert lr_chart(state, log_y=True, show_plan=False)[0].x_max is None


@pytest.mark.parametrize("series", ["lists", "packed"])
def test_snapshot_does_not_mutate_its_input(series: str) -> None:
    snap = daemon_snapshot(build_run()[:300], series=series)
    before = copy.deepcopy(snap)
    RunState().apply_snapshot(snap)
    assert snap == before


@pytest.mark.parametrize(("reason", "last_shown"), [("completed", "done"), ("stopped", "current"), (None, "current")])
def test_a_completed_run_shows_its_last_phase_done(reason: str | None, last_shown: str) -> None:
    """A run that ran to its end has no current phase; a stopped one (resumable) still stands in its phase."""
    events = build_run()
    final = events[-1]
    assert final.kind == "state" and final.data["state"] == "finished"
    data = {**final.data, **({} if reason is None else {"reason": reason})}
    events[-1] = Event(**{**final.__dict__, "data": data})
    live = RunState(tolerant=True)
    live.load_events(events)
    snapped = RunState()
    snapped.apply_snapshot(daemon_snapshot(events))
    for s in (live, snapped):
        shown = [s.phase_state(p) for p in s.phases]
        assert shown == ["done", "done", "done", last_shown], (reason, shown)


def shown(s: RunState) -> tuple:
    """Everything a snapshot puts in the charts and header."""
    return (s.status, s.phase, s.step, s.epoch, s.last_seq, {t: v.points() for t, v in s.lr.items()},
            {k: v.points() for k, v in s.metrics.items()}, s.metric_names(), s.info)


@pytest.mark.parametrize("max_points", [50, 1000])
def test_a_packed_snapshot_shows_what_the_list_form_shows(max_points: int) -> None:
    events = build_run()
    for cut in (5, 170, 600, len(events)):
        lists, packed = RunState(), RunState()
        lists.apply_snapshot(daemon_snapshot(events[:cut], max_points=max_points))
        snap = daemon_snapshot(events[:cut], series="packed", max_points=max_points)
        assert snap["series"] == "packed" and all(isinstance(c["values"], str) for c in snap["lr"].values())
        packed.apply_snapshot(snap)
        assert shown(packed) == shown(lists), cut
        assert any(len(v) for v in packed.lr.values()) or cut == 5


@pytest.mark.parametrize(
    ("column", "text", "reason"),
    [("values", "zz" * 8, "not a hex string"), ("values", "00" * 7, "not a whole number"),
     ("steps", 12, "must be a hex string"), ("values", "0000000 00000000", "not a hex string"),
     ("values", "00 00 0000000000", "not a hex string"), ("values", "0000000000000000" * 2, "differ in length")],
)
def test_a_malformed_packed_snapshot_is_refused_and_changes_nothing(column: str, text: object, reason: str) -> None:
    events = build_run()
    s = RunState()
    s.apply_snapshot(daemon_snapshot(events[:400]))
    before = shown(s)
    snap = daemon_snapshot(events[:500], series="packed")
    tag = next(iter(snap["lr"]))
    snap["lr"][tag][column] = text
    with pytest.raises(ProtocolError, match=reason) as err:
        s.apply_snapshot(snap)
    assert f"lr[{tag!r}].{column}" in str(err.value) or "differ" in str(err.value)
    assert "\n" not in str(err.value)
    assert shown(s) == before


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.integers(0, 10**6).map(float), st.just(math.nan)),
                       st.floats(allow_nan=True, allow_infinity=True)), max_size=120),
    st.integers(0, 40),
)
def test_series_load_equals_appending_each_point(points: list[tuple[float, float]], already: int) -> None:
    """The bulk load a packed snapshot uses gives the series one append per (finite) point gives."""
    one, bulk = Series(capacity=32), Series(capacity=32)
    for i in range(already):
        one.append(float(i), float(i % 5))
        bulk.append(float(i), float(i % 5))
    for x, y in points:
        if math.isfinite(x):
            one.append(x, y)
    bulk.load([x for x, _ in points], [y for _, y in points])
    assert (bulk.points(), bulk.count, bulk.stride) == (one.points(), one.count, one.stride)
    assert repr((bulk.last_x, bulk.last_y)) == repr((one.last_x, one.last_y))  # repr: NaN (no point yet) equals NaN


def test_a_long_plan_is_drawn_from_a_bounded_copy_that_keeps_its_extremes() -> None:
    steps = 20_000
    cosine = [1e-3 * (0.5 + 0.5 * math.cos(i / 500)) + 1e-6 for i in range(steps)]
    late = [math.nan] * 5000 + [2e-4 * 0.99 ** (i // 100) for i in range(steps - 5000)]  # a group added at step 5000
    plan = PlanData.from_dict({"steps": list(range(steps)), "series": {"pg1": cosine, "pg2": late}})
    chart = plan.chart_series()
    assert chart is plan.chart_series()  # computed once
    for tag, values in (("pg1", cosine), ("pg2", late)):
        xs, ys = chart[tag]
        assert len(xs) == len(ys) <= PLAN_CHART_POINTS
        finite = [v for v in values if v == v]
        assert min(ys) == min(finite) and max(ys) == max(finite)  # resets and troughs survive
        assert xs == sorted(xs) and xs[-1] == steps - 1
    assert chart["pg2"][0][0] == 5000  # nothing drawn before the group exists
    assert len(plan.steps) == steps and plan.series["pg1"] == cosine  # the plan itself is untouched
    # a short plan is drawn point for point
    short = PlanData.from_dict({"steps": [0, 1, 2], "series": {"pg1": [1e-3, 2e-3, 3e-3]}})
    assert short.chart_series() == {"pg1": ([0.0, 1.0, 2.0], [1e-3, 2e-3, 3e-3])}


def test_a_stopped_run_says_stopped_in_the_header() -> None:
    import dataclasses

    events = build_run()
    stopped = dataclasses.replace(events[-1], data={**events[-1].data, "reason": "stopped",
                                                     "checkpoint": "/runs/x/checkpoints/stop.ckpt"})
    s = RunState()
    s.load_events([*events[:-1], stopped])
    assert s.status == "finished" and s.end_reason == "stopped"
    assert "● stopped" in "".join(cell for cell, _ in header_lines(s, now=stopped.ts, source="live")[0])
    done = RunState()
    done.load_events(events)
    assert "● finished" in "".join(cell for cell, _ in header_lines(done, now=stopped.ts, source="live")[0])
    # the log says how it ended when that was not the run's own end
    assert [e.text for e in s.log if e.kind == "state"][-1] == "run finished (stopped)"
    assert [e.text for e in done.log if e.kind == "state"][-1] == "run finished"


def test_a_lost_connection_shows_no_stale_rate() -> None:
    events = build_run()
    s = RunState()
    s.load_events(events[:400])
    s.set_connection("live")
    assert s.steps_per_second() is not None
    live = "".join(cell for cell, _ in header_lines(s, now=events[399].ts, source="live")[0])
    assert " steps/s" in live and "– steps/s" not in live
    s.set_connection("lost")
    lost = "".join(cell for cell, _ in header_lines(s, now=events[399].ts, source="live")[0])
    assert "– steps/s" in lost


def test_a_linear_axis_of_values_never_negative_has_no_negative_ticks() -> None:
    """A cosine schedule that reaches 0 padded the axis 5% below zero, so the bottom label read a negative LR."""
    for ys in ([1e-3, 5e-4, 0.0, 2e-4], [0.0, 0.0, 0.0]):
        rows = render_chart(ChartSpec([Trace("lr", [0, 1, 2, 3][: len(ys)], ys)], y_format="lr"), 40, 10)
        lines = ["".join(t for t, _ in row) for row in rows[1:-1]]
        ticks = [float(line.split("┤")[0]) for line in lines if "┤" in line]
        assert ticks and min(ticks) >= 0, ticks
    signed = render_chart(ChartSpec([Trace("m", [0, 1], [-1.0, 1.0])]), 40, 10)
    assert float("".join(t for t, _ in signed[-2]).split("┤")[0]) < 0  # values below zero keep their room


def test_the_header_counts_phases_from_zero() -> None:
    s = replayed()
    text = "".join(cell for cell, _ in header_lines(s, now=0.0, source="replay")[0])
    assert f"phase {s.phase} of 0–{s.n_phases - 1}" in text


def test_a_schedule_cell_too_narrow_for_both_values_keeps_the_edited_one_whole() -> None:
    from fts_tui.views import _cell

    now, then = "StepLR(step_size=25, gamma=0.7)", "StepLR(step_size=20, gamma=0.5)"
    assert _cell(now, then, 80)[0] == f"{now}→{then}"
    text = _cell(now, then, 40)[0]
    assert len(text) == 40 and text.endswith(f"→{then}") and text.startswith("StepLR")
    assert _cell(now, then, 33)[0] == f"→{then}"  # no room for a readable start of the old value
    assert _cell("a", "b", 10)[0] == "a→b" and _cell("x", "x", 10)[0] == "x"
