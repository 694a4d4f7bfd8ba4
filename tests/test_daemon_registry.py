"""The run registry: private runtime dir, atomic 0600 records, finding the live run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fts_daemon import registry

from .daemon_support import private_runtime_dir


@pytest.fixture
def rt(monkeypatch: pytest.MonkeyPatch):
    with private_runtime_dir(monkeypatch) as path:
        yield path


def _record(run: str, pid: int, started: float, state: str = "training") -> registry.RunRecord:
    return registry.RunRecord(run=run, pid=pid, daemon="d", run_dir=f"/r/{run}", pub="ipc://p", ctl="ipc://c",
                              state=state, started=started)


def test_runtime_dir_and_records_are_private(rt: Path) -> None:
    os.chmod(rt, 0o755)
    assert registry.runtime_dir() == rt
    assert stat.S_IMODE(rt.stat().st_mode) == 0o700  # tightened
    path = registry.write_record(_record("a", os.getpid(), 1.0))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert registry.read_record("a").pid == os.getpid()
    assert not list(rt.glob(".*.tmp"))  # atomic write leaves no temp file


def test_default_runtime_dir_is_under_xdg_or_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FTS_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert registry.runtime_dir() == tmp_path / "fts"
    assert stat.S_IMODE((tmp_path / "fts").stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert registry.runtime_dir(create=False).name == f"fts-{os.getuid()}"


def test_find_run_prefers_the_newest_live_run(rt: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.write_record(_record("old", os.getpid(), 1.0))
    registry.write_record(_record("new", os.getpid(), 2.0))
    registry.write_record(_record("gone", dead.pid, 3.0))
    registry.write_record(_record("done", os.getpid(), 4.0, state="finished"))
    (rt / "junk.json").write_text("{not json")
    assert registry.find_run().run == "new"
    assert registry.find_run("gone").live_state == "dead"
    assert [r.run for r in registry.iter_records()] == ["old", "new", "gone", "done"]
    assert registry.prune() == ["gone"]
    with pytest.raises(registry.RegistryError, match="no run named"):
        registry.find_run("nope")


def test_no_live_run_is_a_clear_error(rt: Path) -> None:
    with pytest.raises(registry.RegistryError, match="no live fts-daemon run"):
        registry.find_run()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "x" * 81, "a b"])
def test_run_ids_are_checked(bad: str) -> None:
    with pytest.raises(registry.RegistryError, match="invalid run id"):
        registry.check_run_id(bad)


def test_update_record_and_long_ipc_paths(rt: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    registry.write_record(_record("u", os.getpid(), time.time()))
    assert registry.update_record("u", state="finished", phase=2).phase == 2
    assert registry.read_record("u").state == "finished"
    assert registry.update_record("missing", state="x") is None
    assert registry.ipc_endpoints("u")[0] == f"ipc://{rt}/u.pub"
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setenv("FTS_RUNTIME_DIR", str(deep))
    with pytest.raises(registry.RegistryError, match="too long"):
        registry.ipc_endpoints("u")


def test_registry_imports_without_torch() -> None:
    code = "import sys, fts_daemon.registry, fts_daemon.events, fts_daemon.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_runs_table_stays_aligned_with_long_names() -> None:
    from fts_daemon.cli import runs_table

    def row(run: str, config: list[str], phase: int | None = 1) -> dict:
        return {"run": run, "state": "training", "phase": phase, "config": config,
                "pub": f"ipc:///r/{run}.pub", "ctl": f"ipc:///r/{run}.ctl"}

    lines = runs_table([
        row("a", ["/x/demo.yaml"]),
        row("demo-minilm-20261207-144558-with-a-long-name", ["/c/minilm_defaults.yaml", "/c/minilm_explicit_reinit_lr.yaml"]),
        row("b", [], phase=None),
    ])
    assert lines[0].split() == ["RUN", "STATE", "PHASE", "CONFIG", "ENDPOINTS"]
    # every column starts where its header does
    for header in ("STATE", "PHASE", "CONFIG", "ENDPOINTS"):
        col = lines[0].index(header)
        assert all(line[col - 2:col] == "  " and line[col] != " " or header == "PHASE" for line in lines[1:]), header
    assert [line.index("ipc://") for line in lines[1:]] == [lines[0].index("ENDPOINTS")] * 3
    assert "minilm_defaults.yaml, minilm_explicit_reinit_lr.yaml" in lines[2]
    assert lines[3].split()[2:4] == ["–", "–"]  # no phase yet, no config


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_an_exited_process_not_yet_reaped_is_not_alive() -> None:
    """A killed detached daemon stays a zombie until init reaps it (1-3 s on some hosts); `--resume` then said the
    run was still running."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert registry.pid_alive(child.pid)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # wait for the exit, leave the zombie unreaped
        os.kill(child.pid, 0)  # signal 0 still reaches it: this is what pid_alive must not stop at
        assert not registry.pid_alive(child.pid)
    finally:
        child.wait()
    assert not registry.pid_alive(child.pid)


def test_a_dead_run_whose_recording_ends_finished_is_finished(tmp_path: Path) -> None:
    """Killed between recording ``finished`` and updating the registry, a stopped run was listed as dead."""
    import dataclasses

    from fts_daemon.cli import _status
    from fts_daemon.events import STATE, Event, event_to_json_line
    from fts_daemon.history import run_state

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid nothing runs under any more
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = dataclasses.replace(_record("k", gone.pid, time.time(), state="stopping"), run_dir=str(run_dir))
    lines = [Event(STATE, 1, 1.0, "k", "d", {"state": "stopping", "error": None}, step=7, epoch=1)]
    (run_dir / "events.jsonl").write_text("".join(event_to_json_line(e) + "\n" for e in lines))
    assert run_state(record) == "dead" and _status(record)["state"] == "dead"  # it died while stopping
    lines.append(Event(STATE, 2, 2.0, "k", "d", {"state": "finished", "error": None, "reason": "stopped",
                                                   "checkpoint": "/x/stop.ckpt"}, step=7, epoch=1))
    (run_dir / "events.jsonl").write_text("".join(event_to_json_line(e) + "\n" for e in lines))
    status = _status(record)
    assert run_state(record) == "finished" and status["state"] == "finished" and status["reason"] == "stopped"
