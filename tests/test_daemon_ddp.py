"""``fts-daemon start`` under DDP (gloo, 2 CPU processes): one publisher, edits and stop reach every rank, resume.

Lightning's ``ddp`` strategy starts the same command line again for rank 1. Only rank 0 may bind sockets, register
the run or write the run dir's records; both ranks must apply a queued edit at the same transition (rank 0 applies
it, the engine broadcasts the phase) and stop at the same step when ``stop`` reaches rank 0. Each rank dumps its
per-epoch phase and LRs (``tests/ddp_lr_dump.py``); together they must equal a one-process run of the YAML the
edit describes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.client import Control
from fts_daemon.edits import merge_phase

from .daemon_support import REPO, SCHEDULE, private_runtime_dir, read_events, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow

EDIT = {"lr": 4.0e-3, "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ExponentialLR",
                                                                 "init_args": {"gamma": 0.5}}}}
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
# 2 steps per epoch and rank: phase 0 = epochs 0-1 (steps 0-3), phase 1 = epochs 2-4 (steps 4-9), phase 2 = 5-7
PHASES = copy.deepcopy(SCHEDULE)
PHASES[1]["max_transition_epoch"] = 5
MAX_EPOCHS = 8


def config_with_dump(directory: Path, schedule: dict, dump: Path, name: str, step_delay: float) -> Path:
    path = write_config(directory, schedule, step_delay=step_delay, max_epochs=MAX_EPOCHS, name=name)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "tests.ddp_lr_dump.LRDump", "init_args": {"out_dir": str(dump)}})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fts_start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # rank 1 imports tests.ddp_lr_dump too
    return subprocess.Popen([sys.executable, "-m", "fts_daemon.cli", "start", "--no-progress", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def dumps(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))]


def by_epoch(records: list[dict[str, Any]]) -> dict[int, list[Any]]:
    """Epoch -> [phase, lrs] over the segments of one rank (a resumed epoch must repeat its values)."""
    out: dict[int, list[Any]] = {}
    for rec in records:
        for epoch, phase, lrs in rec["epochs"]:
            assert out.setdefault(epoch, [phase, lrs]) == [phase, lrs], f"epoch {epoch} differs after the resume"
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ddp")
    out: dict[str, Any] = {"base": base}
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp) as rt:
        cfg = config_with_dump(base / "cfg", PHASES, base / "dump1", "d", step_delay=0.3)
        run_dir = base / "run"
        proc = fts_start("--config", str(cfg), "--run", "ddp1", "--run-dir", str(run_dir), *DDP, cwd=base)
        try:
            record = wait_for(lambda: registry.read_record("ddp1") if (rt / "ddp1.json").exists() else None, 120)
            with Control(record.ctl, timeout=30) as ctl:
                wait_for(lambda: ctl.request("hello")["state"] == "training", 120)
                out["records_while_training"] = [r.run for r in registry.iter_records()]
                out["runtime_files"] = sorted(p.name for p in rt.iterdir())
                out["record"] = registry.read_record("ddp1")
                out["queued"] = ctl.request("queue_edit", phase=2, changes=EDIT)
                # in phase 1; the ranks agree on the stop one step later, still in phase 1
                wait_for(lambda: (ctl.request("hello")["step"] or 0) >= 5, 120)
                ctl.request("stop")
            out["first_log"] = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        out["pid"] = proc.pid
        out["first_events"] = read_events(run_dir / "events.jsonl")
        out["dump1"] = dumps(base / "dump1")

        # resume from another directory, naming the run only: its saved config (ddp included) and checkpoint
        elsewhere = base / "elsewhere"
        elsewhere.mkdir()
        proc = fts_start("--run", "ddp1", "--resume", cwd=elsewhere)
        out["resume_log"] = finish(proc)
        out["all_events"] = read_events(run_dir / "events.jsonl")
        out["dumps"] = dumps(base / "dump1")  # both starts, both ranks

        # the reference: one process, the edit written into the YAML from the start
        merged = copy.deepcopy(PHASES)
        merged[2] = merge_phase(merged[2], EDIT)
        ref_cfg = config_with_dump(base / "cfg", merged, base / "dump_ref", "r", step_delay=0.0)
        ref = start_daemon(configs=[str(ref_cfg)], run="ref", run_dir=base / "ref")
        assert ref.join() == 0
        out["reference"] = dumps(base / "dump_ref")
    return out


def test_only_rank_zero_registers_and_publishes(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["records_while_training"] == ["ddp1"]
    assert ddp_run["runtime_files"] == ["ddp1.ctl", "ddp1.json", "ddp1.pub"]
    assert ddp_run["record"].pid == ddp_run["pid"]
    events = ddp_run["first_events"]
    assert len({e.daemon for e in events}) == 1 and [e.seq for e in events] == list(range(1, len(events) + 1))
    lr_steps = [e.step for e in events if e.kind == ev.LR]
    assert lr_steps == sorted(set(lr_steps))  # one lr event per step: a single publisher
    edit_journal = (ddp_run["base"] / "run" / "edits.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in edit_journal][:1] == ["queued"]


def test_stop_reaches_every_rank_at_the_same_step(ddp_run: dict[str, Any]) -> None:
    first = [d for d in ddp_run["dump1"] if not d["resumed"]]
    assert sorted(d["rank"] for d in first) == [0, 1] and all(d["world_size"] == 2 for d in first)
    assert first[0]["step"] == first[1]["step"] and 6 <= first[0]["step"] <= 9
    assert first[0]["weights"] == first[1]["weights"]
    final = [e for e in ddp_run["first_events"] if e.kind == ev.STATE][-1].data
    assert final["reason"] == "stopped" and final["phase"] == 1 and Path(final["checkpoint"]).is_file()


def test_edit_applied_identically_on_both_ranks_and_resume_matches_one_process(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["queued"]["status"] == "queued"
    resumed = [d for d in ddp_run["dumps"] if d["resumed"]]
    assert sorted(d["rank"] for d in resumed) == [0, 1] and resumed[0]["step"] == resumed[1]["step"] == 16
    assert resumed[0]["weights"] == resumed[1]["weights"]
    ranks = [by_epoch([d for d in ddp_run["dumps"] if d["rank"] == r]) for r in (0, 1)]
    reference = by_epoch(ddp_run["reference"])
    assert sorted(reference) == list(range(MAX_EPOCHS))
    assert ranks[0] == ranks[1] == reference  # per-epoch phase and LRs, to the last bit
    phase2_start, phase2_next = reference[5], reference[6]
    assert phase2_start[0] == phase2_next[0] == 2
    assert phase2_next[1] == [lr * 0.5 for lr in phase2_start[1]]  # the edited scheduler: ExponentialLR(gamma=0.5)
    second = [e for e in ddp_run["all_events"] if e.daemon != ddp_run["first_events"][0].daemon]
    assert second[0].data == {"state": "starting", "error": None, "resume": True}
    applied = [e.data["edit"] for e in second if e.kind == ev.EDIT and e.data["edit"]["status"] == "applied"]
    assert [e["id"] for e in applied] == [ddp_run["queued"]["id"]]
    assert [e.data["state"] for e in second if e.kind == ev.STATE][-1] == "finished"


def test_moving_a_parameter_into_an_earlier_phase_under_ddp(tmp_path: Path) -> None:
    """Two edits move a parameter from phase 2 into phase 1. Between the transitions phase 2 still names it; rank 1
    rebuilds the schedule from rank 0's broadcast phase at each transition and must leave it out of phase 2 as rank 0
    does (it refused the schedule as overlapping, and the run died there)."""
    moved = "model.deberta.encoder.rel_embeddings.weight"
    into_1 = {"params": [*PHASES[1]["params"], moved]}
    out_of_2 = {"params": [p for p in PHASES[2]["params"] if p != moved]}
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp) as rt:
        cfg = config_with_dump(tmp_path / "cfg", PHASES, tmp_path / "dump", "m", step_delay=0.3)
        proc = fts_start("--config", str(cfg), "--run", "ddpm", "--run-dir", str(tmp_path / "run"), *DDP,
                         cwd=tmp_path)
        try:
            record = wait_for(lambda: registry.read_record("ddpm") if (rt / "ddpm.json").exists() else None, 120)
            with Control(record.ctl, timeout=30) as ctl:
                wait_for(lambda: ctl.request("hello")["state"] == "training", 120)
                queued = [ctl.request("queue_edit", phase=2, changes=out_of_2),
                          ctl.request("queue_edit", phase=1, changes=into_1)]
            finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        reference_schedule = copy.deepcopy(PHASES)
        reference_schedule[1].update(into_1)
        reference_schedule[2].update(out_of_2)
        ref_cfg = config_with_dump(tmp_path / "cfg", reference_schedule, tmp_path / "dump_ref", "mr", step_delay=0.0)
        ref = start_daemon(configs=[str(ref_cfg)], run="ddpm-ref", run_dir=tmp_path / "ref")
        assert ref.join() == 0
    assert [q["status"] for q in queued] == ["queued", "queued"]
    events = read_events(tmp_path / "run" / "events.jsonl")
    applied = [e.data["edit"]["id"] for e in events if e.kind == ev.EDIT and e.data["edit"]["status"] == "applied"]
    assert sorted(applied) == sorted(q["id"] for q in queued)
    ranks = dumps(tmp_path / "dump")
    (reference,) = dumps(tmp_path / "dump_ref")
    assert sorted(d["rank"] for d in ranks) == [0, 1] and ranks[0]["weights"] == ranks[1]["weights"]
    for rank in ranks:
        assert by_epoch([rank]) == by_epoch([reference])  # per-epoch phase and LRs
        assert moved in rank["grouped"] and rank["grouped"] == reference["grouped"]
