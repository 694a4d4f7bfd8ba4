"""``stop`` leaves a resumable checkpoint; ``--resume`` continues with the edits still queued in the journal.

Run C queues edits for phases 1 and 2 during phase 0, is stopped in phase 1 (phase 1's edit applied, phase 2's
pending), and is resumed from its run dir alone (saved config, newest checkpoint, journal). Its LRs after the resume
must equal those of an uninterrupted run of the YAML the edits describe.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.client import Control, Follower
from fts_daemon.edits import Journal, merge_phase, replay_journal

from .daemon_support import SCHEDULE, lr_by_step, private_runtime_dir, read_events, start_daemon, wait_for, write_config

EDITS = [
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ExponentialLR",
                                                     "init_args": {"gamma": 0.5}}}}),
    (2, {"lr": 4.0e-3}),
    (1, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"gamma": 0.6}}}}),
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        out: dict[str, Any] = {"base": base}
        cfg = write_config(base, SCHEDULE, step_delay=0.08, name="c")
        c = start_daemon(configs=[str(cfg)], run="resume-c", run_dir=base / "c")
        with Follower(c.pub, c.ctl) as follower, Control(c.ctl) as ctl:
            for kind, item in follower.follow(timeout=60):
                if kind == "event" and item.kind == ev.LR:
                    break
            out["queued"] = [ctl.request("queue_edit", phase=p, changes=ch) for p, ch in EDITS]
            wait_for(lambda: (c.daemon.bus.history.step or 0) >= 10, timeout=60)
            out["stop_reply"] = ctl.request("stop")
        assert c.join() == 0
        out["record_after_stop"] = registry.read_record("resume-c")
        out["c_events"] = read_events(base / "c" / "events.jsonl")

        d = start_daemon(configs=[], resume=True, run="resume-c", run_dir=base / "c")
        assert d.join() == 0
        out["d_daemon"] = d.daemon.bus.daemon
        out["all_events"] = read_events(base / "c" / "events.jsonl")

        merged = copy.deepcopy(SCHEDULE)
        for phase, changes in EDITS:
            merged[phase] = merge_phase(merged[phase], changes)
        e = start_daemon(configs=[str(write_config(base, merged, name="e"))], run="resume-e", run_dir=base / "e")
        assert e.join() == 0
        out["e_events"] = read_events(base / "e" / "events.jsonl")
        yield out


def test_stop_finishes_the_step_checkpoints_and_exits_cleanly(resumed: dict) -> None:
    assert resumed["stop_reply"]["stopping"] is True
    events = resumed["c_events"]
    states = [e.data for e in events if e.kind == ev.STATE]
    assert [s["state"] for s in states][-2:] == ["stopping", "finished"]
    final = states[-1]
    assert final["reason"] == "stopped" and final["phase"] == 1
    # no validation over the stopped epoch's partial data after the stop (Lightning runs one when should_stop is set)
    stopping = next(i for i, e in enumerate(events) if e.kind == ev.STATE and e.data["state"] == "stopping")
    assert not [e for e in events[stopping:] if e.kind == ev.METRIC and e.data["stage"] == "val"]
    ckpt = torch.load(final["checkpoint"], weights_only=False)
    assert ckpt["callbacks"]["FinetuningScheduler"]["depth"] == 1
    pending = {e["id"]: e["status"] for e in ckpt["callbacks"]["DaemonTap"]["edits"]}
    assert pending == {"e1": "queued", "e2": "queued", "e3": "applied"}  # pending edits travel in the checkpoint
    assert resumed["record_after_stop"].state == "finished"
    steps = [e.step for e in events if e.kind == ev.LR]
    assert steps == list(range(len(steps))) and 10 <= len(steps) < 16
    # the steps this start took and how long its training lasted (each step sleeps step_delay=0.08 s)
    assert final["train_steps"] == len(steps) and final["train_seconds"] >= 0.08 * len(steps)


def test_resume_continues_with_the_queued_edits(resumed: dict) -> None:
    d_events = [e for e in resumed["all_events"] if e.daemon == resumed["d_daemon"]]
    assert d_events[0].data == {"state": "starting", "error": None, "resume": True}
    assert [e.seq for e in d_events] == list(range(1, len(d_events) + 1))  # a new daemon id numbers from 1
    applied = {e.data["edit"]["id"]: e.data["edit"]["applied_step"] for e in d_events
               if e.kind == ev.EDIT and e.data["edit"]["status"] == "applied"}
    assert applied == {"e1": 16, "e2": 16, "e3": 8}  # e3 was applied before the stop (re-announced on resume)
    trans = [e.data for e in d_events if e.kind == ev.TRANSITION]
    assert len(trans) == 1 and trans[0]["to"] == 2
    assert trans[0]["scheduler"]["lr_scheduler_init"]["class_path"] == "torch.optim.lr_scheduler.ExponentialLR"
    final = replay_journal(Journal(resumed["base"] / "c" / "edits.jsonl").read())
    assert {k: v.status for k, v in final.items()} == {"e1": "applied", "e2": "applied", "e3": "applied"}
    # LRs after the resume equal those of an uninterrupted run of the edited YAML, step for step
    lr_d = lr_by_step(d_events)
    lr_e = lr_by_step(resumed["e_events"])
    c_steps = {e.step for e in resumed["c_events"] if e.kind == ev.LR}
    assert lr_d and min(lr_d) == max(c_steps) + 1 and max(lr_d) == 23
    assert d_events[-1].data["train_steps"] == len(lr_d)  # this start's steps, not the run's
    assert lr_d == {step: lr_e[step] for step in lr_d}
    lr_c = lr_by_step(resumed["c_events"])
    assert lr_c == {step: lr_e[step] for step in lr_c}


def test_stop_at_epoch_end_resumes_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_runtime_dir(monkeypatch):
        straight = start_daemon(configs=[str(write_config(tmp_path, SCHEDULE, name="f"))], run="f",
                                run_dir=tmp_path / "f")
        assert straight.join() == 0
        expected = straight.daemon.trainer.lightning_module.state_dict()

        cfg = write_config(tmp_path, SCHEDULE, step_delay=0.05, name="g")
        g = start_daemon(configs=[str(cfg)], run="g", run_dir=tmp_path / "g")
        wait_for(lambda: (g.daemon.bus.history.step or 0) >= 9, timeout=60)  # in epoch 2 (phase 1)
        with Control(g.ctl) as ctl:
            ctl.request("stop", when="epoch")
        assert g.join() == 0
        final = [e for e in read_events(tmp_path / "g" / "events.jsonl") if e.kind == ev.STATE][-1].data
        assert final["reason"] == "stopped" and "step=12" in final["checkpoint"]  # the end of epoch 2

        h = start_daemon(configs=[], resume=True, run="g", run_dir=tmp_path / "g")
        assert h.join() == 0
        resumed = h.daemon.trainer.lightning_module.state_dict()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
