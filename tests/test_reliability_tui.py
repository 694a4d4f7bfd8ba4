"""Daemon restart under a live TUI: the cockpit (the real Textual app, driven by Pilot) follows a real daemon, the
daemon is killed (SIGKILL: no goodbye), the header says the connection is lost; ``fts-daemon start --resume``
brings the run back on new tcp ports, and the same app instance finds it through the registry and resyncs to the
new daemon -- nobody restarts the TUI.

Complements ``test_tui_client.py::test_daemon_goes_away_and_comes_back`` (an event bus alone, same endpoints) and
``test_tui_e2e.py`` (a real daemon and the app, no restart).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fts_tui.app import FtsApp
from fts_tui.client import LiveSource, resolve_target
from fts_tui.widgets import RunHeader

from .daemon_support import SCHEDULE, write_config
from .reliability_support import DaemonProcess, env_for, figure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def until(cond: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.asyncio
async def test_tui_survives_a_daemon_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("FTS_RUNTIME_DIR", str(runtime))
    env = env_for(runtime)
    cfg = write_config(tmp_path / "cfg", SCHEDULE, step_delay=0.1, max_epochs=12, name="tui")
    run_dir = tmp_path / "run"
    first = DaemonProcess.start("tui", run_dir, env, config=cfg, extra=["--transport", "tcp"])
    second = None
    try:
        first_record = first.record()
        source = LiveSource(resolve_target("tui"), heartbeat_timeout=2.0, request_timeout=5.0)
        app = FtsApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            state = source.state
            header = app.query_one(RunHeader)
            await until(lambda: state.connection == "live" and state.status == "training" and (state.step or 0) >= 6,
                        90, "the first daemon to train")
            await pilot.pause(0.2)
            assert "live" in header.plain and state.daemon == first_record.daemon
            killed_at_step = state.step
            first.kill()
            t_kill = time.monotonic()
            await until(lambda: state.connection == "lost", 30, "the TUI to notice")
            lost_after = time.monotonic() - t_kill
            await pilot.pause(0.3)
            lost_header = header.plain
            assert "lost" in lost_header, lost_header

            second = DaemonProcess.start("tui", run_dir, env, resume=True, extra=["--transport", "tcp"])
            second_record = second.record()
            t_listening = time.monotonic()
            assert (second_record.pub, second_record.ctl) != (first_record.pub, first_record.ctl)  # new ports
            await until(lambda: state.connection == "live" and state.daemon == second_record.daemon
                        and (state.step or 0) > 0, 90, "the TUI to resync to the new daemon")
            resync_after = time.monotonic() - t_listening
            resumed_from = state.step
            await until(lambda: (state.step or 0) >= resumed_from + 3, 60, "steps of the new daemon")
            await pilot.pause(0.3)
            live_header = header.plain
            assert "live" in live_header and "lost" not in live_header, live_header
            assert app.is_running and source.snapshots >= 2
            await pilot.press("q")
    finally:
        first.ensure_dead()
        if second is not None:
            second.signal(signal.SIGTERM)
            second.wait(60)
    figure("tui-daemon-restart",
           f"SIGKILL at step {killed_at_step}: header showed 'lost' {lost_after:.1f}s later; the resumed daemon "
           f"(new tcp ports, found again through the registry) was followed {resync_after:.1f}s after it listened, "
           f"from step {resumed_from}, in the same app ({source.snapshots} snapshots in all)")
