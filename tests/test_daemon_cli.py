"""``fts-daemon`` end to end, as a user runs it: separate processes, --detach, status, edit, stop, SIGTERM, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fts_daemon import events as ev
from fts_daemon import registry

from .daemon_support import REPO, SCHEDULE, private_runtime_dir, read_events, wait_for, write_config

pytestmark = pytest.mark.slow


def fts(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fts_daemon.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_cli_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_runtime_dir(monkeypatch):
        cfg = write_config(tmp_path / "cfg", step_delay=0.25, max_epochs=6)
        started = fts("start", "--config", str(cfg), "--run", "cli1", "--detach", cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        assert "fts-tui attach cli1" in started.stdout
        run_dir = tmp_path / "runs" / "cli1"

        def status() -> dict:
            out = fts("status", "--json", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        info = wait_for(lambda: (s := status())["state"] == "training" and s, timeout=120)
        assert {"run", "pid", "state", "phase", "run_dir", "pub", "ctl"} <= set(info)
        assert info["run"] == "cli1" and Path(info["run_dir"]) == run_dir and info["pub"].startswith("ipc://")
        runs = json.loads(fts("runs", "--json", cwd=tmp_path).stdout)
        assert [r["run"] for r in runs] == ["cli1"]

        ok = fts("edit", "cli1", "--phase", "2", "--lr", "0.004", "--scheduler", "torch.optim.lr_scheduler.StepLR",
                 "--scheduler-arg", "step_size=1", "--scheduler-arg", "gamma=0.5", cwd=tmp_path)
        assert ok.returncode == 0 and "edit e1 queued for phase 2" in ok.stdout, ok.stderr
        refused = fts("edit", "--phase", "0", "--lr", "1", cwd=tmp_path)
        assert refused.returncode == 1 and "current phase" in refused.stderr
        listed = fts("edit", "cli1", "--list", "--json", cwd=tmp_path)
        assert [e["id"] for e in json.loads(listed.stdout)["edits"]] == ["e1"]

        stopped = fts("stop", "cli1", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert registry.read_record("cli1").state == "finished"
        final = [e for e in read_events(run_dir / "events.jsonl") if e.kind == ev.STATE][-1]
        assert final.data["reason"] == "stopped" and Path(final.data["checkpoint"]).is_file()

        # resume from the run dir alone, then end it with SIGTERM: graceful again (checkpoint, exit 0)
        resumed = fts("start", "--resume", "--run-dir", str(run_dir), "--detach", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        record = registry.read_record("cli1")
        wait_for(lambda: fts("status", "--json", cwd=tmp_path).stdout.count('"training"'), timeout=120)
        os.kill(record.pid, signal.SIGTERM)
        wait_for(lambda: not registry.pid_alive(record.pid), timeout=120)
        events = [e for e in read_events(run_dir / "events.jsonl") if e.daemon == record.daemon]
        assert events[-1].kind == ev.STATE and events[-1].data["reason"] == "stopped"
        assert any(e.kind == ev.EDIT and e.data["edit"]["id"] == "e1" for e in events)  # pending edit came back
        assert "SIGTERM: stopping after this step" in (run_dir / "daemon.log").read_text()
        assert registry.read_record("cli1").state == "finished"
        assert fts("status", "cli1", cwd=tmp_path).stdout.startswith("run cli1: finished")
        # a run that has exited: step and epoch from where its recording ends
        done = json.loads(fts("status", "cli1", "--json", cwd=tmp_path).stdout)
        recorded = read_events(run_dir / "events.jsonl")
        last_step = [e.step for e in recorded if e.step is not None][-1]
        last_epoch = [e.epoch for e in recorded if e.epoch is not None][-1]
        assert not done["reachable"] and (done["step"], done["epoch"]) == (last_step, last_epoch), done
        # and how it ended: stopped with a checkpoint to resume from, after this start's steps
        assert done["reason"] == "stopped" and done["checkpoint"] == events[-1].data["checkpoint"], done
        assert done["train_steps"] == events[-1].data["train_steps"] > 0 and done["error"] is None
        text = fts("status", "cli1", cwd=tmp_path).stdout
        assert f"  resume  : fts-daemon start --resume --run-dir {run_dir}" in text
        assert f"  trained : {done['train_steps']} steps in " in text and "steps/s), stopped" in text


def test_cli_run_dir_is_one_daemons_and_keeps_its_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_runtime_dir(monkeypatch):
        cfg = write_config(tmp_path / "cfg", step_delay=0.25, max_epochs=16)  # ~16 s: time to stop it in its final phase
        run_dir = tmp_path / "experiment-7"  # not named after the run
        first = fts("start", "--config", str(cfg), "--run", "owner", "--run-dir", str(run_dir), "--detach", cwd=tmp_path)
        assert first.returncode == 0 and "run owner started in the background" in first.stdout, first.stderr
        pid = registry.read_record("owner").pid
        # a second daemon, under another run id, must not write the same recording, journal and checkpoints
        second = fts("start", "--config", str(cfg), "--run", "intruder", "--run-dir", str(run_dir), "--detach",
                     cwd=tmp_path)
        assert second.returncode == 2
        assert f"run dir {run_dir} is in use by another daemon (run owner, pid {pid})" in second.stderr
        assert {e.daemon for e in read_events(run_dir / "events.jsonl")} == {registry.read_record("owner").daemon}
        # a config that cannot run is reported by `start --detach` itself, not found later by `status`
        bad = fts("start", "--config", str(tmp_path / "missing.yaml"), "--run", "bad", "--detach", cwd=tmp_path)
        assert bad.returncode == 1 and "run bad failed: config file not found" in bad.stderr, bad.stderr
        # the final phase (4 steps an epoch, phase 2 from epoch 4): a resume there has no transition left to make
        wait_for(lambda: registry.read_record("owner").phase == 2, timeout=120)
        stopped = fts("stop", "owner", cwd=tmp_path)
        assert f"resume with: fts-daemon start --resume --run-dir {run_dir}" in stopped.stdout, stopped.stdout
        stop_ckpt = [e for e in read_events(run_dir / "events.jsonl") if e.kind == ev.STATE][-1].data["checkpoint"]
        # that command, as printed, resumes the run under its own id (the directory's name is not the id), from
        # the checkpoint the stop wrote (Lightning's checkpoint callback may have written one at the same step)
        resumed = fts("start", "--resume", "--run-dir", str(run_dir), "--detach", cwd=tmp_path)
        assert resumed.returncode == 0 and "run owner started in the background" in resumed.stdout, resumed.stderr
        assert f"  resume  : {stop_ckpt}" in (run_dir / "daemon.log").read_text()
        # resumed in phase 2 with no transition to announce it: the registry knows all the same
        record = registry.read_record("owner")
        assert record.phase == 2 and record.state == "training"
        # resumed from its saved config.yaml, the run still names the config it was started with
        assert record.config == [str(Path(cfg).resolve())]
        second_daemon = record.daemon
        assert fts("stop", "owner", cwd=tmp_path).returncode == 0
        events = read_events(run_dir / "events.jsonl")
        assert {e.run for e in events} == {"owner"}
        mine = [e for e in events if e.daemon == second_daemon and e.kind == ev.STATE]
        # the loops are restored after fit start: the resumed start's "training" does not claim step 0, epoch 0
        training = next(e for e in mine if e.data["state"] == "training")
        assert (training.step, training.epoch) == (None, None)
        assert registry.read_record("owner").phase == mine[-1].data["phase"]
        # asking an exited run for anything it would have to answer: said at once, not after a timeout
        late = fts("edit", "owner", "--phase", "2", "--lr", "0.1", cwd=tmp_path, timeout=4)
        assert late.returncode == 1 and "run owner is not running (state finished)" in late.stderr, late.stderr
        empty = fts("status", "", cwd=tmp_path)
        assert empty.returncode == 1 and "the run name is empty" in empty.stderr


def test_cli_validate_plan_and_foreground_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_runtime_dir(monkeypatch):
        cfg = write_config(tmp_path / "cfg", max_epochs=5)
        broken = {k: dict(v) for k, v in SCHEDULE.items()}
        broken[0]["params"] = ["model.klassifier.bias"]
        out = fts("validate", str(write_config(tmp_path / "bad", broken)), cwd=tmp_path)
        assert out.returncode == 1 and "model.klassifier.bias" in out.stderr and "matches no parameter" in out.stderr
        good = fts("validate", str(cfg), cwd=tmp_path)
        assert good.returncode == 0 and ": OK (3 phases, max_depth 2)" in good.stdout, good.stderr
        assert "  schedule: /" in good.stdout  # which file a relative ft_schedule resolved to
        plan = fts("plan", str(cfg), "--json", cwd=tmp_path)
        assert plan.returncode == 0, plan.stderr
        assert [s["phase"] for s in json.loads(plan.stdout)["plan"]["phase_starts"]] == [0, 1, 2]
        # a run of 2.5M steps: every step simulated, ~20k kept (a run of 125M steps held ~10 GB); the table is exact
        long = fts("plan", str(cfg), "--steps-per-epoch", "5000", "--max-epochs", "500", cwd=tmp_path)
        assert long.returncode == 0, long.stderr
        assert "a run of 2,500,000 steps: MIN and MAX are read every 125th step" in long.stdout
        assert "    2     4-499 20000-2499999" in long.stdout
        # start epochs that no run could have: one line saying why, no traceback, nothing planned
        for bad, reason in (("1=x", "expects PHASE=EPOCH[,...] with integers, got '1=x'"),
                            ("1=-4", "phase 1 cannot start at epoch -4: the earliest is epoch 1"),
                            ("5=3", "phase 5 cannot be given a start epoch: the schedule has phases 0..2"),
                            ("2=2,1=2", "phase 2 would start at epoch 2, not after phase 1 (epoch 2)"),
                            ("1=9", "phase 1 cannot start at epoch 9: phase 0's max_transition_epoch 2 ends it by "
                                    "epoch 2")):
            refused = fts("plan", str(cfg), "--transition-epochs", bad, cwd=tmp_path)
            assert refused.returncode == 1 and reason in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr and "PHASE" not in refused.stdout
        zero = fts("plan", str(cfg), "--steps-per-epoch", "0", cwd=tmp_path)
        assert zero.returncode == 2 and "--steps-per-epoch: must be at least 1, got 0" in zero.stderr
        # foreground, at full speed, with a LightningCLI override passed through
        run = fts("start", "--config", str(cfg), "--run", "fg", "--no-progress", "--trainer.max_epochs=3",
                  "--transport", "tcp", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "events  : tcp://127.0.0.1:" in run.stdout and "run fg finished" in run.stdout
        events = read_events(tmp_path / "runs" / "fg" / "events.jsonl")
        assert max(e.epoch or 0 for e in events) == 2 == events[-1].epoch and events[-1].data["reason"] == "completed"
        # the run's average rate is the TUI's steps/s once it has finished
        assert events[-1].data["train_steps"] == events[-1].step > 0 and events[-1].data["train_seconds"] > 0
        # torch 2.13 deprecates an API Lightning calls: not the user's to act on, so info rather than a warning
        leaf = [e.data for e in events if e.kind == ev.LOG and "LeafSpec" in e.data["message"]]
        assert leaf and all(d["level"] == "info" and "(inside pytorch_lightning)" in d["message"] for d in leaf)
        refused = fts("start", "--config", str(cfg), "--run", "open", "--pub", "tcp://0.0.0.0:0", "--ctl",
                      "tcp://127.0.0.1:0", cwd=tmp_path)
        assert refused.returncode == 2 and "without CURVE" in refused.stdout


def test_library_deprecations_are_info_and_everything_else_a_warning(tmp_path: Path) -> None:
    import pytorch_lightning

    from fts_daemon.runner import warning_entry

    inside = str(Path(pytorch_lightning.__file__).parent / "utilities" / "_pytree.py")
    assert warning_entry(FutureWarning, "old API", inside) == {
        "level": "info", "message": "FutureWarning: old API (inside pytorch_lightning)"}
    assert warning_entry(DeprecationWarning, "x", inside)["level"] == "info"
    # a library's other warnings, and deprecations the user's own code runs into, stay warnings
    assert warning_entry(UserWarning, "check this", inside) == {"level": "warning", "message": "UserWarning: check this"}
    mine = tmp_path / "my_module.py"
    assert warning_entry(FutureWarning, "old API", str(mine))["level"] == "warning"
    assert warning_entry(FutureWarning, "old API", "")["level"] == "warning"


def test_lightnings_product_tips_stay_out_of_the_event_log() -> None:
    import logging

    from fts_daemon.runner import _BusLogHandler

    published: list[dict] = []
    handler = _BusLogHandler(lambda kind, data: published.append(data))
    logger = logging.getLogger("pytorch_lightning.fts_test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # the two tips Lightning 2.6 prints (a default ModelCheckpoint, no LitLogger), then a line that is news
        logger.info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/"
                    "project/litmodels/) to enable LitModelCheckpoint, which syncs automatically with the Lightning"
                    " model registry.")
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        logger.info("GPU available: False, used: False")
        logger.warning("something to look at")
    finally:
        logger.removeHandler(handler)
    assert published == [{"level": "info", "message": "GPU available: False, used: False"},
                         {"level": "warning", "message": "something to look at"}]


def test_edit_flags_become_typed_changes() -> None:
    """Numbers on the command line arrive as numbers (YAML 1.1 alone reads ``1e-4`` as a string)."""
    from fts_daemon.cli import _changes_from_args, build_parser

    args = build_parser().parse_args([
        "edit", "r", "--phase", "2", "--scheduler", "torch.optim.lr_scheduler.StepLR", "--scheduler-arg",
        "step_size=10", "--scheduler-arg", "gamma=5e-1", "--init-pg-lrs", "1e-4, 2.5e-5,3"])
    sched = _changes_from_args(args)["new_lr_scheduler"]
    assert sched["lr_scheduler_init"]["init_args"] == {"step_size": 10, "gamma": 0.5}
    assert sched["init_pg_lrs"] == [1e-4, 2.5e-5, 3.0]
    assert all(type(v) is float for v in sched["init_pg_lrs"])

    bad = build_parser().parse_args(["edit", "r", "--phase", "2", "--init-pg-lrs", "1e-4,fast"])
    with pytest.raises(SystemExit, match=r"new_lr_scheduler.init_pg_lrs \(--init-pg-lrs\): 'fast' is not a number"):
        _changes_from_args(bad)
    nan = build_parser().parse_args(["edit", "r", "--phase", "2", "--init-pg-lrs", "nan"])
    with pytest.raises(SystemExit, match="finite"):
        _changes_from_args(nan)
    lr_nan = build_parser().parse_args(["edit", "r", "--phase", "2", "--lr", "nan"])
    with pytest.raises(SystemExit, match=r"^fts-daemon: edit refused: phase 2: changes.lr = nan: not a finite number$"):
        _changes_from_args(lr_nan, "phase 2: changes")


def test_start_checkpoint_every_flag() -> None:
    from fts_daemon.cli import _start_options, build_parser

    args = build_parser().parse_args(["start", "--config", "c.yaml", "--checkpoint-every", "3"])
    assert _start_options(args, []).checkpoint_every == 3
    defaults = build_parser().parse_args(["start", "--config", "c.yaml"])
    assert (defaults.checkpoint_every, defaults.checkpoint_overhead) == (1, 0.01)
    args = build_parser().parse_args(["start", "--config", "c.yaml", "--checkpoint-overhead", "0"])
    assert _start_options(args, []).checkpoint_overhead == 0.0
    for bad in ("-0.1", "nan", "2", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["start", "--config", "c.yaml", "--checkpoint-overhead", bad])


def test_start_batch_ms_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from fts_daemon.bus import BusConfig
    from fts_daemon.cli import _start_options, build_parser
    from fts_daemon.runner import StartOptions

    defaults = _start_options(build_parser().parse_args(["start", "--config", "c.yaml"]), [])
    assert defaults.batch_ms == StartOptions.batch_ms == BusConfig.batch_ms == 100.0  # one default, wherever read
    args = build_parser().parse_args(["start", "--config", "c.yaml", "--batch-ms", "20"])
    assert _start_options(args, []).batch_ms == 20.0
    for bad in ("-1", "nan", "5000", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["start", "--config", "c.yaml", "--batch-ms", bad])
        assert f"--batch-ms: must be milliseconds from 0 to 1000, got '{bad}'" in capsys.readouterr().err


def test_detach_of_a_generate_only_config_says_where_the_schedule_went(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "started in the background ... and is still starting" for a daemon that had already exited."""
    cfg = yaml.safe_load((REPO / "configs" / "demo_implicit_reinit_lr.yaml").read_text())
    fts_cb = next(cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == "fts_daemon.FinetuningScheduler")
    fts_cb["init_args"]["gen_ft_sched_only"] = True
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with private_runtime_dir(monkeypatch):
        out = fts("start", "--config", str(path), "--run", "gen1", "--run-dir", str(tmp_path / "run"), "--detach",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "still starting" not in out.stdout and "started in the background" not in out.stdout
    first = out.stdout.splitlines()[0]
    assert first.startswith("fts-daemon: run gen1 finished: schedule generated (") and first.endswith(
        "TinyClassifier_ft_schedule.yaml)"), out.stdout
    written = Path(first.split("(", 1)[1].rstrip(")"))
    assert written.is_file() and yaml.safe_load(written.read_text())[0]["params"]
