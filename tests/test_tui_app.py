"""The cockpit driven with ``App.run_test()`` + ``Pilot``: every screen, the keys, and the edit flow.

Sources are in memory (a replay of the recorded demo run, or a :class:`MemorySource` holding the first part of it
with a scripted daemon), so no sockets are involved; tests/test_tui_client.py covers the wire.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Markdown, SelectionList, TextArea

from fts_tui.app import FtsApp
from fts_tui.screens import EditsScreen, HelpScreen, MetricPicker, PhaseScreen
from fts_tui.source import MemorySource, ReplaySource, RequestError
from fts_tui.state import RunState
from fts_tui.widgets import Chart, EventLog, RunHeader, ScheduleTable
from fts_tui.widgets.edit_form import EditForm
from tests.data.make_recordings import build_run, plan_for

DEMO = Path(__file__).resolve().parent / "data" / "demo_run"
SIZE = (160, 48)
MID_RUN = 500  # events: phase 2 is current; e1 queued for phase 3, e2 queued then cancelled


@pytest.fixture(autouse=True)
def _utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


class FakeDaemon:
    """Answers control ops the way fts-daemon does, enough for the UI (edits refused with a reason, plans)."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.next_id = 3
        self.refuse_cancel = ""  # the daemon's reason, when it refuses a cancel
        self.refuse_plan = ""  # ... and a plan of an edit

    def __call__(self, op: str, args: dict[str, Any]) -> Any:
        if op == "plan":
            if self.refuse_plan and args.get("changes"):
                raise RequestError(self.refuse_plan)
            return plan_for(args.get("changes"))
        if op == "queue_edit":
            lr = args["changes"].get("lr")
            if lr is not None and lr > 1e-3:
                raise RequestError(f"phase {args['phase']}: lr = {lr}: larger than the 0.001 this run allows")
            edit = {"id": f"e{self.next_id}", "phase": args["phase"], "changes": args["changes"], "status": "queued",
                    "error": None, "created": 1767268830.0 + self.next_id, "applied_step": None}
            self.next_id += 1
            return copy.deepcopy(edit)
        if op == "cancel_edit":
            if self.refuse_cancel:
                raise RequestError(self.refuse_cancel)
            edit = self.state.edits[args["edit_id"]]
            return {**edit.__dict__, "status": "cancelled"}  # fts-daemon answers with the edit record
        if op == "list_edits":
            return [e.__dict__ for e in self.state.edits.values()]
        raise RequestError(f"op {op!r} is not available in this daemon")


def live_app(cut: int = MID_RUN) -> tuple[FtsApp, MemorySource]:
    state = RunState()
    source = MemorySource(state, handler=FakeDaemon(state), label="tcp://127.0.0.1:5555")
    source.feed(build_run()[:cut])
    state.set_plan(plan_for())
    return FtsApp(source, clock=lambda: 1000.0), source


def replay_app() -> FtsApp:
    source = ReplaySource(DEMO)
    source.load()
    return FtsApp(source, clock=lambda: 1000.0)


def notes(app: FtsApp) -> list[str]:
    return [n.message for n in app._notifications]


async def open_form_for_phase_3(app: FtsApp, pilot: Any) -> EditForm:
    """From the current phase (2), down to phase 3 and `e`: the edit form, open."""
    await pilot.pause()
    await pilot.press("down", "e")
    await pilot.pause()
    form = app.screen
    assert isinstance(form, EditForm) and form.phase == 3
    return form


@pytest.mark.asyncio
async def test_replay_main_screen_shows_the_whole_run() -> None:
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        header = app.query_one(RunHeader).plain
        for part in ("demo-explicit-reinit", "SentimentMiniLM", "finished", "phase 3 of 0–3", "epoch 13", "step 560", "steps/s", "replay"):
            assert part in header
        table = app.query_one(ScheduleTable)
        assert table.row_count == 4 and table.selected_phase() == 3
        row1 = [str(c) for c in table.get_row("1")]
        assert row1[1] == "done" and row1[3] == "1e-05" and row1[5].startswith("StepLR(") and row1[6] == "[2e-06] (1/2)"
        assert row1[7] == "≤4 / 4"
        assert "✓ applied @400" in [str(c) for c in table.get_row("3")][8]
        lr = app.query_one("#lr-chart", Chart)
        # LearningRateMonitor's tags; the shared base is said once before the group names
        assert lr.spec.legend_prefix == "Explicit_Reinit_LR_Scheduler/"
        assert [e.label for e in lr.legend] == [f"phase{i}" for i in range(4)]
        text = "\n".join(lr.text_rows())
        assert "P1" in text and "P3" in text and "┊" in text
        assert "log-y" in str(lr.border_title)
        log = app.query_one(EventLog)
        assert any("phase 2 → 3 at epoch 10, step 400 (early stopping)" in e for e in log.entries)
        assert log.entries[-1].endswith("run finished")


@pytest.mark.asyncio
async def test_view_keys_log_plan_overlay_metrics_zoom() -> None:
    app, _ = live_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        lr = app.query_one("#lr-chart", Chart)
        assert any(t.dotted for t in lr.spec.traces) and lr.spec.log_y
        await pilot.press("l")
        assert not lr.spec.log_y and "linear" in str(lr.border_title)
        await pilot.press("t")
        assert not any(t.dotted for t in lr.spec.traces) and "hidden" in str(lr.border_subtitle)
        await pilot.press("t")
        # the plan's absence says why once: the daemon's "no plan yet: ..." as it is, anything else after "no plan:"
        for error, shown in (("no plan yet: the number of steps per epoch is known once training starts",
                              "no plan yet: the number of steps per epoch is known once training starts"),
                             ("no reply from the daemon", "no plan: no reply from the daemon")):
            app.state.set_plan(None, error)
            app.redraw()
            await pilot.pause()
            assert str(lr.border_subtitle) == shown
        app.state.set_plan(None)
        app.state.set_planning(True)  # the client's request is in flight
        app.redraw()
        await pilot.pause()
        assert str(lr.border_subtitle) == "┈ planning…"
        app.state.set_planning(False)
        app.state.set_plan({**plan_for(), "horizon_epochs": 9})  # a long run's plan, simulated to a horizon
        app.redraw()
        await pilot.pause()
        assert str(lr.border_subtitle) == "┈ planned to epoch 9 (t)"
        app.state.set_planning(True)  # asked again after an edit: the curves shown are the old plan's meanwhile
        app.redraw()
        await pilot.pause()
        assert str(lr.border_subtitle) == "┈ planned to epoch 9 · re-planning…"
        app.state.set_planning(False)
        app.state.set_plan(plan_for())
        await pilot.press("t")
        metrics = app.query_one("#metric-chart", Chart)
        assert [t.label for t in metrics.spec.traces] == ["train_loss", "val_loss"]
        await pilot.press("o")
        assert [t.label for t in metrics.spec.traces] == ["phase 0", "phase 1", "phase 2"]
        assert "by phase" in str(metrics.border_title) and metrics.spec.x_label == "+step"
        await pilot.press("o", "m")
        await pilot.pause()
        assert isinstance(app.screen, MetricPicker)
        picker = app.screen.query_one(SelectionList)
        picker.focus()
        await pilot.press("down", "space")  # val_acc on
        await pilot.press("enter")
        await pilot.pause()
        assert app.metric_names == ["train_loss", "val_acc", "val_loss"]
        assert [t.label for t in metrics.spec.traces] == ["train_loss", "val_acc", "val_loss"]
        lr.focus()
        await pilot.press("z")
        assert app.screen.maximized is lr
        await pilot.press("z")
        assert app.screen.maximized is None


@pytest.mark.asyncio
async def test_help_and_phase_details() -> None:
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("up", "enter")  # phase 2
        await pilot.pause()
        assert isinstance(app.screen, PhaseScreen) and app.screen.phase == 2
        md = app.screen.query_one(Markdown).source
        assert "Params (8)" in md and "encoder.layer.5.output.dense.bias" in md and "CosineAnnealingWarmRestarts" in md
        assert "phase0, phase1, phase2" in md
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, PhaseScreen)


@pytest.mark.asyncio
async def test_replay_is_read_only() -> None:
    app = replay_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("e")
        await pilot.pause()
        assert not isinstance(app.screen, EditForm)
        assert any("read-only" in n for n in notes(app))
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, EditsScreen)
        table = app.screen.query_one(DataTable)
        assert table.row_count == 2
        rows = {str(table.get_row_at(i)[0]): [str(c) for c in table.get_row_at(i)] for i in range(2)}
        assert rows["e1"][2] == "applied" and rows["e1"][4] == "step 400"
        assert rows["e2"][2] == "cancelled"
        await pilot.press("c")
        assert any("read-only" in n for n in notes(app))


@pytest.mark.asyncio
async def test_edit_flow_rejected_then_queued() -> None:
    app, source = live_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        table = app.query_one(ScheduleTable)
        assert table.selected_phase() == 2  # the cursor starts on the current phase
        await pilot.press("down", "e")
        await pilot.pause()
        form = app.screen
        assert isinstance(form, EditForm) and form.phase == 3
        assert "4 groups in this phase: phase0, phase1, phase2, phase3" in str(form.query_one("#edit-groups").render())
        # the form starts from phase 3 as it will run: with the queued e1 merged in
        assert form.query_one("#edit-lr", Input).value == "5e-06"
        assert "ExponentialLR" in str(form.query_one("#edit-class").value)
        await pilot.pause(0.1)
        # nothing changed yet: the plan as it stands, with the phases already started pinned to their real epochs
        assert ("plan", {"transition_epochs": {"1": 4, "2": 7}}) in source.requests
        assert form.preview is not None and form.query_one("#edit-preview", Chart).spec.traces
        # too large: the daemon refuses, the reason shows, nothing is queued
        form.query_one("#edit-lr", Input).value = "0.5"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert isinstance(app.screen, EditForm)
        assert form.last_error == "rejected: phase 3: lr = 0.5: larger than the 0.001 this run allows"
        assert set(source.state.edits) == {"e1", "e2"}
        form.query_one("#edit-lr", Input).value = "2e-05"
        await pilot.pause(0.6)  # debounced preview of the edited plan
        assert source.requests[-1] == ("plan", {"transition_epochs": {"1": 4, "2": 7}, "phase": 3, "changes": {"lr": 2e-05}})
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, EditForm)
        assert ("queue_edit", {"phase": 3, "changes": {"lr": 2e-05}}) in source.requests
        assert source.state.edits["e3"].status == "queued"
        assert "edit e3 queued for phase 3" in notes(app)
        await pilot.pause(0.15)
        assert str(table.get_row("3")[8]) == "✎ 2 queued"
        assert "✎ 2 pending edits" in app.query_one(RunHeader).plain


@pytest.mark.asyncio
async def test_form_checks_fields_locally() -> None:
    app, source = live_app()
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form_for_phase_3(app, pilot)
        form.query_one("#edit-init-args", TextArea).text = "gamma: [unclosed"
        await pilot.pause()
        assert form.last_error.startswith("init_args:")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not any(op == "queue_edit" for op, _ in source.requests)
        form.query_one("#edit-init-args", TextArea).text = "gamma: 0.8"
        await pilot.pause()
        assert form.last_error == ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert form.last_error == "nothing changed: edit a field first"
        form.query_one("#edit-init-pg-lrs", Input).value = "1e-6, 1e-6"
        await pilot.pause()
        assert "2 value(s): phase2, phase3 keep their current lr" in str(form.query_one("#edit-groups").render())
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, EditForm)


@pytest.mark.asyncio
async def test_current_and_past_phases_are_not_editable() -> None:
    app, _ = live_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        await pilot.press("e")  # phase 2: current
        await pilot.pause()
        assert not isinstance(app.screen, EditForm)
        assert "phase 2 is current: only phases that have not started can be edited (select phase 3 with ↓)" in notes(app)
        await pilot.press("up", "e")
        assert "phase 1 is done: only phases that have not started can be edited (select phase 3 with ↓)" in notes(app)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Edit phase 3" in titles and "Edit phase 2" not in titles and "Edit phase 1" not in titles
        assert {"Edits", "Toggle log-y", "Toggle planned trajectory", "Choose metrics", "Help", "Phase 1 details"} <= set(titles)
        # the command palette lists them and runs them
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"edit phase 3")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, EditForm) and app.screen.phase == 3


@pytest.mark.asyncio
async def test_a_refused_cancel_shows_the_whole_reason() -> None:
    app, source = live_app()
    reason = ("edit e1 cannot be cancelled alone; cancel e9 first: the queued edits left would not validate (phase 3: "
              "new_lr_scheduler.lr_scheduler_init.init_args = {'T_0': 3, 'T_mult': 2, 'eta_min': 1e-05, 'gamma': "
              "0.3}: CosineAnnealingWarmRestarts.__init__() got an unexpected keyword argument 'gamma')")
    source.handler.refuse_cancel = reason
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await pilot.press("p")
        await pilot.pause()
        await pilot.press("c")
        await pilot.pause(0.2)
        status = app.screen.query_one("#edits-status")
        shown = "".join(strip.text for strip in status.render_lines(status.region.reset_offset))
        assert "cancel e9 first" in shown and shown.rstrip().endswith("argument 'gamma')"), shown
        assert status.region.height > 1
        assert source.state.edits["e1"].status == "queued"
        assert any(f"cancel e1 refused: {reason}" == e.text for e in source.state.log)


@pytest.mark.asyncio
async def test_cancel_a_pending_edit() -> None:
    app, source = live_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("p")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, EditsScreen)
        assert ("list_edits", {}) in source.requests
        table = screen.query_one(DataTable)
        assert str(table.get_row_at(0)[0]) == "e1" and "queued" in str(table.get_row_at(0)[2])
        await pilot.press("c")
        await pilot.pause(0.1)
        assert ("cancel_edit", {"edit_id": "e1"}) in source.requests
        assert source.state.edits["e1"].status == "cancelled"
        await pilot.pause(0.15)
        assert "cancelled" in str(table.get_row_at(table.row_count - 1)[2]) or "cancelled" in str(table.get_row_at(0)[2])
        assert "edit e1 cancelled" in notes(app)


@pytest.mark.asyncio
async def test_header_says_when_the_daemon_is_lost_and_events_flow_in() -> None:
    app, source = live_app(cut=300)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "● live" in app.query_one(RunHeader).plain
        source.state.last_heard = 988.0
        source.state.set_connection("lost")
        for _ in range(40):  # the next tick (every 0.1 s) shows it; a busy CI host may run it late
            await pilot.pause(0.05)
            if "lost" in app.query_one(RunHeader).plain:
                break
        assert "lost — no heartbeat for 12s" in app.query_one(RunHeader).plain
        before = app.query_one("#lr-chart", Chart).builds
        source.feed(build_run()[300:560])
        await pilot.pause(0.25)
        assert app.query_one(ScheduleTable).selected_phase() is not None
        assert app.query_one("#lr-chart", Chart).builds <= before + 3  # redrawn per tick, not per event
        assert "step 4" in app.query_one(RunHeader).plain


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        # startup never loads torch or Lightning
        ("fts_tui.app, fts_tui.cli, fts_tui.client, fts_tui.edits", ("torch", "pytorch_lightning", "lightning")),
        # the state model and what draws from it are pure: no UI toolkit, no sockets
        ("fts_tui.state, fts_tui.views, fts_tui.plot, fts_tui.series, fts_tui.replay", ("textual", "zmq", "torch")),
    ],
)
def test_imports_stay_light(modules: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {modules}\nbad = [m for m in {forbidden!r} if m in sys.modules]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_replay_of_a_missing_run_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fts_tui.cli import main

    assert main(["replay", str(tmp_path)]) == 2
    assert "no events.jsonl" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_mouse_selects_phases_and_focuses_panels() -> None:
    app = replay_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        # row 1 of the table: border, header, phase 0, phase 1
        await pilot.click(ScheduleTable, offset=(6, 3))
        assert app.query_one(ScheduleTable).selected_phase() == 1
        await pilot.click(ScheduleTable, offset=(6, 3))  # a click on the highlighted row opens it
        await pilot.pause()
        assert isinstance(app.screen, PhaseScreen) and app.screen.phase == 1
        await pilot.press("escape")
        await pilot.pause()
        await pilot.click("#metric-chart")
        assert app.focused is app.query_one("#metric-chart")


@pytest.mark.asyncio
async def test_a_frame_repaints_only_the_chart_rows_that_changed() -> None:
    """Following a run, most frames change a row or two of each chart: only those are handed to Textual (the
    charts' titles, set with every frame, must not repaint the whole widget either), and what stays on screen is
    what a full repaint shows."""
    events = build_run()
    source = MemorySource(label="rows")
    source.feed(events[:300])
    app = FtsApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        charts = [app.lr_chart, app.metric_chart]
        painted: list[int] = []
        for chart in charts:
            draw = chart.render_line

            def counting(y: int, draw=draw) -> Any:
                painted.append(y)
                return draw(y)

            chart.render_line = counting  # type: ignore[method-assign]
        frames, asked = app.frames, [c.repainted_rows for c in charts]
        for i in range(300, 340, 4):  # ten small bursts: a few steps' LRs and metrics each
            source.feed(events[i : i + 4])
            await pilot.pause(0.12)
        assert app.frames >= frames + 5
        asked = [c.repainted_rows - a for c, a in zip(charts, asked)]
        rows = sum(c.size.height for c in charts)
        # Textual painted what the charts asked for (a frame can change a row of each, or none), not whole charts
        assert len(painted) == sum(asked) < (app.frames - frames) * rows / 4
        shown = [[s.text for s in c.render_lines(c.size.region)] for c in charts]
        for chart in charts:
            chart.set_chart(chart.spec, chart.legend)
            chart._rows = None  # force a build from scratch, then a repaint of every row
            chart.refresh()
        await pilot.pause(0.1)
        assert [[s.text for s in c.render_lines(c.size.region)] for c in charts] == shown


@pytest.mark.asyncio
async def test_a_burst_is_drawn_when_it_arrives_and_frames_keep_their_pace() -> None:
    # one frame a second at most, and a tick as slow: a burst drawn within 0.2 s was drawn because it arrived
    source = MemorySource(label="burst")
    source.feed(build_run()[:300])
    app = FtsApp(source, redraw_hz=1.0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.2)  # the first frame is old enough for the next one
        chart = app.query_one("#lr-chart", Chart)
        before = chart.builds
        source.feed(build_run()[300:400])
        await pilot.pause(0.2)
        assert chart.builds == before + 1
        assert f"step {source.state.step}" in app.query_one(RunHeader).plain  # the same frame's header
        # a second burst right after waits for the frame rate: one frame a second, however many bursts
        source.feed(build_run()[400:450])
        await pilot.pause(0.2)
        assert chart.builds == before + 1
        source.feed(build_run()[450:500])
        await pilot.pause(1.0)
        assert chart.builds == before + 2


@pytest.mark.asyncio
async def test_on_a_busy_host_the_cpu_budget_spaces_frames_but_keys_still_draw_at_once() -> None:
    events = build_run()
    frames: dict[str, int] = {}
    for budget in (None, 1e-4):  # no budget, then one no frame fits in: a frame a second
        source = MemorySource(label="busy")
        source.feed(events[:300])
        app = FtsApp(source, cpu_budget=budget, busy=lambda: True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.3)
            first = app.frames
            for i in range(300, 360, 2):  # 30 bursts, 60 ms apart: ~1.8 s
                source.feed(events[i : i + 2])
                await pilot.pause(0.06)
            frames[str(budget)] = app.frames - first
            header = app.query_one(RunHeader).plain
            if budget is None:
                assert "cores busy" not in header
                continue
            assert "drawing every 1.0s: cores busy" in header
            # the charts show the data of the last frame, at most a second old; a key redraws at once
            title = app.lr_chart.border_title
            await pilot.press("l")
            await pilot.pause(0.05)
            assert app.lr_chart.border_title != title
    assert frames["None"] >= 10
    assert 1 <= frames["0.0001"] <= 3


@pytest.mark.asyncio
async def test_on_a_small_terminal_the_focused_field_scrolls_into_view() -> None:
    app, _ = live_app()
    async with app.run_test(size=(80, 24)) as pilot:
        form = await open_form_for_phase_3(app, pilot)
        params = form.query_one("#edit-params", TextArea)
        fields = form.query_one("#edit-fields")
        for _ in range(12):  # tab through the fields until params has the focus
            if form.focused is params:
                break
            await pilot.press("tab")
            await pilot.pause()
        assert form.focused is params
        await pilot.pause(0.3)  # the scroll animates
        visible = fields.content_region
        assert params.region.height > 0 and visible.contains_region(params.region.intersection(visible))
        assert params.region.y < visible.bottom and params.region.bottom > visible.y, (params.region, visible)
        await pilot.press("z", "z")
        await pilot.pause()
        assert "zz" in params.text


@pytest.mark.asyncio
async def test_the_edit_form_notices_its_phase_starting() -> None:
    app, source = live_app()
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form_for_phase_3(app, pilot)
        assert not form.closed_reason
        events = build_run()
        start = next(i for i, e in enumerate(events) if e.kind == "transition" and e.data["to"] == 3)
        source.feed(events[MID_RUN:start + 1])
        await pilot.pause(0.5)  # the next frame
        assert form.closed_reason.startswith("phase 3 has started: it can no longer be edited")
        assert "phase 3 has started" in str(form.query_one("#edit-title").render())
        sent = len(source.requests)
        form.query_one("#edit-lr", Input).value = "1e-6"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert len([r for r in source.requests[sent:] if r[0] == "queue_edit"]) == 0
        assert form.last_error == form.closed_reason


@pytest.mark.asyncio
async def test_a_refused_preview_shows_its_whole_reason_until_a_preview_works() -> None:
    app, source = live_app()
    reason = ("phase 3: new_lr_scheduler.lr_scheduler_init.init_args.gamma = 'abc': ExponentialLR takes a finite "
              "number here")
    source.handler.refuse_plan = reason
    async with app.run_test(size=SIZE) as pilot:
        form = await open_form_for_phase_3(app, pilot)
        form.query_one("#edit-lr", Input).value = "2e-6"
        await pilot.pause()
        await pilot.press("ctrl+r")
        await pilot.pause(0.3)
        assert form.last_error == f"preview: {reason}"
        assert form.query_one("#edit-preview").border_subtitle == "preview unavailable: the reason is below"
        source.handler.refuse_plan = ""
        await pilot.press("ctrl+r")
        await pilot.pause(0.3)
        assert form.last_error == "" and form.preview is not None


@pytest.mark.asyncio
async def test_on_a_narrow_terminal_the_header_keeps_its_connection_row() -> None:
    app, _ = live_app()
    async with app.run_test(size=(60, 20)) as pilot:
        await pilot.pause()
        header = app.query_one("#header")
        rows = [strip.text for strip in header.render_lines(header.region.reset_offset)]
        assert len(rows) == 2 and rows[0].lstrip().startswith("fts ") and "live" in rows[1], rows
        assert rows[0].rstrip().endswith("…")  # the first row is cut, not wrapped over the second
