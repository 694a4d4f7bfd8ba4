"""Moving a parameter into an earlier phase with two queued edits, across a stop and a resume in between.

The documented way: narrow the later phase (e1), then widen the earlier one (e2); both are accepted. At the
transition into the earlier phase, e2 used to be checked without e1, clash with the later phase as it still was,
and be rejected there; e1 then applied, and the parameter was in no phase: never trained. Between the two
transitions the later phase still names the parameter (its edit applies at its own transition), which is also what a
checkpoint written then holds: the resume must take that too. The result must be the YAML with the move written in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fts_daemon import events as ev
from fts_daemon.client import Control, Follower

from .daemon_support import SCHEDULE, lr_by_step, private_runtime_dir, read_events, start_daemon, write_config

MOVED = "model.deberta.encoder.rel_embeddings.weight"
PHASE1 = [*SCHEDULE[1]["params"], MOVED]
PHASE2 = [p for p in SCHEDULE[2]["params"] if p != MOVED]
OPTIONS = {"checkpoint_overhead": 0.0}  # last.ckpt at every epoch end: the final one holds the final weights


def moved_schedule() -> dict:
    sched = copy.deepcopy(SCHEDULE)
    sched[1]["params"], sched[2]["params"] = PHASE1, PHASE2
    return sched


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("moves")
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        yaml_cfg = write_config(base / "yaml", moved_schedule(), name="y")
        reference = start_daemon(configs=[str(yaml_cfg)], run="mv-yaml", run_dir=base / "yaml" / "run", **OPTIONS)
        assert reference.join() == 0, reference.daemon.error

        cfg = write_config(base / "edited", SCHEDULE, step_delay=0.05, name="e")
        first = start_daemon(configs=[str(cfg)], run="mv-edit", run_dir=base / "edited" / "run", **OPTIONS)
        with Follower(first.pub, first.ctl) as follower, Control(first.ctl) as ctl:
            stop_sent = False
            for kind, item in follower.follow(timeout=60):
                if kind != "event":
                    continue
                if item.kind == ev.LR and item.step == 1:
                    e1 = ctl.request("queue_edit", phase=2, changes={"params": PHASE2})
                    e2 = ctl.request("queue_edit", phase=1, changes={"params": PHASE1})
                if item.kind == ev.TRANSITION and item.data["to"] == 1 and not stop_sent:
                    ctl.request("stop", when="epoch")  # a checkpoint between the two transitions
                    stop_sent = True
                if item.kind == ev.STATE and item.data["state"] in ("finished", "failed"):
                    break
        assert first.join() == 0, first.daemon.error
        second = start_daemon(configs=[], resume=True, run="mv-edit", run_dir=base / "edited" / "run", **OPTIONS)
        assert second.join() == 0, second.daemon.error
    return {"base": base, "queued": (e1, e2)}


def test_both_edits_apply_and_the_run_equals_the_yaml(runs: dict) -> None:
    base = runs["base"]
    assert [e["status"] for e in runs["queued"]] == ["queued", "queued"]
    edited = read_events(base / "edited" / "run" / "events.jsonl")
    final = {e.data["edit"]["id"]: e.data["edit"] for e in edited if e.kind == ev.EDIT}
    assert {k: v["status"] for k, v in final.items()} == {"e1": "applied", "e2": "applied"}, final
    starts = [e.data for e in edited if e.kind == ev.STATE and e.data["state"] == "starting"]
    assert len(starts) == 2 and starts[1]["resume"]  # the resume came between the two transitions
    reference = read_events(base / "yaml" / "run" / "events.jsonl")
    assert lr_by_step(edited) == lr_by_step(reference)
    a = torch.load(base / "edited" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(base / "yaml" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], tensor), name
    # the moved parameter trained: it is in the optimizer, in phase 1's group
    groups = a["callbacks"]
    fts_state = next(v for k, v in groups.items() if "FinetuningScheduler" in k)
    owners = [g for g in fts_state["groups"] if MOVED in g["params"]]
    assert len(owners) == 1


@pytest.mark.parametrize("start_limit,edited_limit", [(None, 7), (7, 5)], ids=["raise", "lower"])
def test_an_edited_final_limit_moves_the_end_of_the_run_as_the_yaml_does(
        tmp_path: Path, start_limit: int | None, edited_limit: int) -> None:
    """A final phase's max_transition_epoch raises max_epochs (6 here) to the largest limit at setup; an edit of it
    did not, so the edited run ended at 6 where the YAML's ran to 7, and a lowered limit kept the raise."""
    before, after = copy.deepcopy(SCHEDULE), copy.deepcopy(SCHEDULE)
    if start_limit is not None:
        before[2]["max_transition_epoch"] = start_limit
    after[2]["max_transition_epoch"] = edited_limit
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        reference = start_daemon(configs=[str(write_config(tmp_path / "y", after, name="y"))], run="lim-y",
                                 run_dir=tmp_path / "y" / "run")
        assert reference.join() == 0, reference.daemon.error
        edited = start_daemon(configs=[str(write_config(tmp_path / "e", before, step_delay=0.05, name="e"))],
                              run="lim-e", run_dir=tmp_path / "e" / "run")
        with Follower(edited.pub, edited.ctl) as follower, Control(edited.ctl) as ctl:
            for kind, item in follower.follow(timeout=60):
                if kind == "event" and item.kind == ev.LR:
                    ctl.request("queue_edit", phase=2, changes={"max_transition_epoch": edited_limit})
                    break
        assert edited.join() == 0, edited.daemon.error
    a, b = read_events(tmp_path / "e" / "run" / "events.jsonl"), read_events(tmp_path / "y" / "run" / "events.jsonl")
    assert max(lr_by_step(b)) + 1 == 4 * max(edited_limit, 6)  # 4 steps an epoch: the YAML's run, as FTS has it
    assert lr_by_step(a) == lr_by_step(b)
