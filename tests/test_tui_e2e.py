"""End to end: a real ``fts-daemon`` on loopback, the cockpit attached to it, an edit queued through the edit form.

The daemon trains the demo config (tiny model, synthetic data) slowed down a little so phase 0 lasts long enough to
attach and edit. Through the TUI we change phase 1's ``init_pg_lrs``; the form's preview (the daemon's planner with
the edit applied) says what the four groups will start phase 1 at, and the LRs the run then reports at phase 1's
first step must be exactly those. Quitting the TUI afterwards must not disturb training: the run still finishes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import Input

from fts_tui.app import FtsApp
from fts_tui.client import LiveSource, resolve_target
from fts_tui.widgets import ScheduleTable
from fts_tui.widgets.edit_form import EditForm

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_explicit_reinit_lr.yaml"
NEW_PG_LRS = [5.0e-4, 5.0e-4, 7.0e-4, 7.0e-4]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def daemon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fts_daemon.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.asyncio
async def test_edit_queued_in_the_tui_changes_the_next_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not CONFIG.is_file():
        pytest.skip("the demo config is not in this checkout")
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("FTS_RUNTIME_DIR", str(runtime))
    env = {**os.environ, "FTS_RUNTIME_DIR": str(runtime)}
    run_dir = tmp_path / "run"
    started = daemon("start", "--config", str(CONFIG), "--run", "e2e", "--run-dir", str(run_dir), "--detach",
                     "--transport", "tcp", "--model.init_args.step_delay=0.12", "--trainer.max_epochs=6", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    log = run_dir / "daemon.log"
    try:
        source = LiveSource(resolve_target("e2e"), request_timeout=20.0)
        assert source.target.ctl.startswith("tcp://127.0.0.1:")
        app = FtsApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            state = source.state
            await until(lambda: state.connection == "live" and state.status == "training" and state.n_phases == 3,
                        60, "the run to train")
            assert state.phase == 0 and state.groups_for(1) == ["phase0", "phase0_no_decay", "phase1", "phase1_no_decay"]
            await pilot.pause(0.2)
            app.query_one(ScheduleTable).select_phase(1)
            await pilot.press("e")
            await until(lambda: isinstance(app.screen, EditForm), 5, "the edit form")
            form = app.screen
            assert isinstance(form, EditForm)
            form.query_one("#edit-init-pg-lrs", Input).value = "[" + ", ".join(map(str, NEW_PG_LRS)) + "]"
            await pilot.pause()
            await pilot.press("ctrl+r")

            def planned_at_phase1() -> tuple[int, dict[str, float]] | None:
                if form.preview is None:
                    return None
                start = next(int(p["step"]) for p in form.preview.phase_starts if p["phase"] == 1)
                return start, {tag: values[start] for tag, values in form.preview.series.items()}

            # the preview is the daemon's planner run on the schedule with this edit merged in
            await until(lambda: (p := planned_at_phase1()) is not None and sorted(p[1].values()) == sorted(NEW_PG_LRS),
                        30, "the preview of the edited plan")
            start_step, planned = planned_at_phase1()  # type: ignore[misc]
            assert state.phase == 0, "phase 0 ended before the edit could be sent; slow the demo down"
            await pilot.press("ctrl+s")
            await until(lambda: not isinstance(app.screen, EditForm), 20, "the daemon to accept the edit")
            assert form.last_error in ("", "sending…"), form.last_error
            edit = next(e for e in state.edits.values() if e.phase == 1)
            assert edit.status == "queued" and edit.changes["new_lr_scheduler"]["init_pg_lrs"] == NEW_PG_LRS
            await until(lambda: state.phase == 1 and state.step is not None and state.step > start_step + 2, 90, "phase 1")
            assert state.edits[edit.id].status == "applied"
            assert state.edits[edit.id].applied_step == start_step
            transition = state.transitions[-1]
            assert (transition.to_phase, transition.step) == (1, start_step)
            actual = {}
            for tag, series in state.lr.items():
                xs, ys = series.points()
                actual[tag] = dict(zip(xs, ys)).get(float(start_step))
            assert actual == pytest.approx(planned, rel=1e-12)
            await pilot.press("q")
        # quitting the TUI did not disturb training: the run goes on to finish by itself
        deadline = time.monotonic() + 120
        events = run_dir / "events.jsonl"
        while time.monotonic() < deadline:
            lines = events.read_text().splitlines()
            if any('"state":"finished"' in line for line in lines[-5:]):
                break
            time.sleep(0.5)
        last_states = [json.loads(x)["data"].get("state") for x in lines if '"kind":"state"' in x]
        assert last_states[-1] == "finished", log.read_text()[-3000:]
    finally:
        daemon("stop", "e2e", "--timeout", "30", env=env)
