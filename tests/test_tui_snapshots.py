"""SVG snapshots of the main screens at a fixed terminal size (pytest-textual-snapshot).

Everything shown is fixed: recorded events, a frozen clock, UTC, no cursor blink, a stable source label.
Update after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import time

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, TextArea

from fts_tui.app import FtsApp
from fts_tui.source import MemorySource, ReplaySource
from fts_tui.state import RunState
from tests.data.make_recordings import build_run, plan_for
from tests.test_tui_app import DEMO, MID_RUN, FakeDaemon

SIZE = (160, 48)


@pytest.fixture(autouse=True)
def _utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def replay() -> FtsApp:
    source = ReplaySource(DEMO)
    source.load()
    source.label = "tests/data/demo_run/events.jsonl"
    return FtsApp(source, clock=lambda: 1000.0)


def live() -> FtsApp:
    state = RunState()
    source = MemorySource(state, handler=FakeDaemon(state), label="tcp://127.0.0.1:5555")
    source.feed(build_run()[:MID_RUN])
    state.last_heard = 999.0
    state.set_plan(plan_for())
    return FtsApp(source, clock=lambda: 1000.0)


async def settle(pilot: Pilot) -> None:
    await pilot.pause(0.3)
    for widget in pilot.app.screen.query("Input, TextArea"):
        if isinstance(widget, (Input, TextArea)):
            widget.cursor_blink = False
    await pilot.pause()


# (name, app, keys pressed before the snapshot)
SCREENS = [
    ("replay_main_screen", replay, ()),
    ("live_main_screen_with_plan_and_pending_edit", live, ()),
    ("edit_form_with_preview", live, ("down", "e")),
    ("edits_screen", live, ("p",)),
    ("phase_details", replay, ("up", "enter")),
    ("help_screen", replay, ("question_mark",)),
    ("metric_overlay_linear_lr", replay, ("o", "l")),
]


@pytest.mark.parametrize("make, keys", [(make, keys) for _, make, keys in SCREENS], ids=[name for name, _, _ in SCREENS])
def test_screen(snap_compare, make, keys: tuple[str, ...]) -> None:
    async def run_before(pilot: Pilot) -> None:
        await pilot.press(*keys)
        await settle(pilot)

    assert snap_compare(make(), terminal_size=SIZE, run_before=run_before)
