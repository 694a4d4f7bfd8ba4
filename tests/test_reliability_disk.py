"""A run dir that cannot be written: a clear error at start, or at the first failed write a stop with a checkpoint
(if one can still be written) and a one-line reason.

"Disk full" is simulated with ``RLIMIT_FSIZE`` in the daemon's process (a write past the limit fails with EFBIG, as
a full disk fails with ENOSPC), which works without root and also as root (root ignores file permissions, so a
read-only directory only tests anything for other users; that case runs when the tests do not run as root).
TensorBoard is off in these runs so that ``events.jsonl``, the file that grows fastest, is the first to fail.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fts_daemon import registry

from .daemon_support import SCHEDULE, write_config
from .reliability_support import REPO, env_for, figure, read_event_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def start(tmp_path: Path, run: str, run_dir: Path, preexec: Callable[[], None] | None = None,
          extra: tuple[str, ...] = (), config: Path | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700, exist_ok=True)
    args = [sys.executable, "-m", "fts_daemon.cli", "start", "--run", run, "--run-dir", str(run_dir), "--no-progress",
            "--trainer.logger=false", *extra]
    if config is not None:
        args += ["--config", str(config)]
    if resume:
        args.append("--resume")
    # output through pipes (not files): the file size limit must only bite in the run dir
    return subprocess.run(args, cwd=REPO, env=env_for(runtime), capture_output=True, text=True, timeout=240,
                          preexec_fn=preexec)


def config(tmp_path: Path) -> Path:
    """100 steps per epoch; 5 extra ``log`` events per step make events.jsonl grow ~1.5 kB a step, so it reaches a
    300 kB limit in epoch 2, long before a checkpoint (about 220 kB) would."""
    path = write_config(tmp_path / "cfg", SCHEDULE, max_epochs=4, num_train=32 * 100, name="disk")
    data = yaml.safe_load(path.read_text())
    data["trainer"]["callbacks"].append({"class_path": "tests.reliability_probe.Chatter", "init_args": {"per_step": 5}})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def no_traceback(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    return out


def test_unwritable_run_dir_is_a_clear_error_at_start(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    lines = []
    under_file = start(tmp_path, "nodir", blocker / "run", config=cfg)
    out = no_traceback(under_file)
    assert under_file.returncode == 2 and "is not writable: Not a directory" in out, out
    lines.append(next(line for line in out.splitlines() if "not writable" in line))
    tiny = start(tmp_path, "tiny", tmp_path / "tiny", preexec=limit_file_size(1024), config=cfg)
    out = no_traceback(tiny)
    assert tiny.returncode == 2 and "is not writable: File too large" in out, out
    lines.append(next(line for line in out.splitlines() if "not writable" in line))
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        read_only = start(tmp_path, "ro", ro / "run", config=cfg)
        out = no_traceback(read_only)
        assert read_only.returncode == 2 and "not writable" in out, out
        lines.append(next(line for line in out.splitlines() if "not writable" in line))
    figure("unwritable-run-dir", "refused at start, exit 2, one line each: " + " | ".join(
        line.replace(str(tmp_path), "<tmp>") for line in lines))


def run_until_the_disk_fills(tmp_path: Path, limit: int, name: str) -> tuple[subprocess.CompletedProcess, Any, Path]:
    run_dir = tmp_path / name
    proc = start(tmp_path, name, run_dir, preexec=limit_file_size(limit), config=config(tmp_path))
    return proc, registry.read_record(name, tmp_path / "rt"), run_dir


def test_disk_full_mid_run_stops_with_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    proc, record, run_dir = run_until_the_disk_fills(tmp_path, 300_000, "full")
    out = no_traceback(proc)
    assert proc.returncode == 1, out
    line = next(line for line in out.splitlines() if "failed:" in line)
    assert "cannot write" in line and "events.jsonl: File too large" in line and "stopped with a checkpoint" in line
    assert record.state == "failed"
    ckpt = Path(line.split("stopped with a checkpoint: ")[1].split(";")[0])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # complete, loadable
    events = read_event_file(run_dir / "events.jsonl")
    assert not events.bad_lines
    written = max(e.step or 0 for e in events.events)
    # space is freed: the run resumes from that checkpoint and completes
    resumed = start(tmp_path, "full", run_dir, resume=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = [e for e in read_event_file(run_dir / "events.jsonl").events if e.daemon != record.daemon]
    assert after[-1].data["reason"] == "completed" and min(e.step for e in after if e.kind == "lr") == \
        state["global_step"]
    figure("disk-full (events.jsonl)",
           f"file size limit 300 kB: events.jsonl write failed at step ~{written}; the run stopped after that step "
           f"with a checkpoint (global step {state['global_step']}), exit 1, one line: "
           f"{line.replace(str(tmp_path), '<tmp>')!r}; resumed from it after space was freed and completed")


def test_disk_full_when_not_even_a_checkpoint_fits(tmp_path: Path) -> None:
    proc, record, _ = run_until_the_disk_fills(tmp_path, 60_000, "full2")
    out = no_traceback(proc)
    assert proc.returncode == 1, out
    line = next(line for line in out.splitlines() if "failed:" in line)
    # events.jsonl fails first, then the stop's checkpoint (bigger than the limit): the line says both, and which files
    assert "events.jsonl: File too large" in line and "no checkpoint could be written either" in line, line
    assert record.state == "failed"
    figure("disk-full (no room for a checkpoint)",
           f"file size limit 60 kB: exit 1, one line: {line.replace(str(tmp_path), '<tmp>')!r}")
