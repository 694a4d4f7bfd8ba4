"""Queued edits on a real daemon (real Trainer, real sockets, real files).

One module-scoped pair of runs serves several tests:

* run A trains the base schedule; while it is in phase 0 a client queues edits for phases 1 and 2 (one is then
  cancelled) and sends a barrage of invalid edits and malformed frames;
* run B trains, from the start, the YAML that A's accepted edits describe; a late subscriber follows it.

A's LRs must equal B's step for step (an edit behaves exactly as if it had been in the YAML), and B's weights must
equal a plain Lightning run of the same config (publishing changes nothing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fts_daemon import events as ev
from fts_daemon import runner
from fts_daemon.client import Control, ControlError, Follower
from fts_daemon.edits import Journal, merge_phase, replay_journal

from .daemon_support import (
    SCHEDULE,
    lr_by_step,
    private_runtime_dir,
    read_events,
    start_daemon,
    wait_for,
    write_config,
)

EXP = {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.5}}
EXP_MERGED = {**EXP, "init_args": {"gamma": 0.4}}  # e1 with e5's argument
ACCEPTED = [  # (phase, changes): e1..e4; e3 is cancelled afterwards
    (2, {"new_lr_scheduler": {"lr_scheduler_init": EXP}}),
    (2, {"lr": 4.0e-3, "new_lr_scheduler": {"init_pg_lrs": [1.5e-3] * 6}}),
    (1, {"lr": 5.0e-3, "max_transition_epoch": 3}),
    (1, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"gamma": 0.6}}}}),
    # builds on e1: only ExponentialLR takes gamma, so e1 cannot be cancelled while e5 is queued
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"gamma": 0.4}}}}),
]
REJECTED = [  # (phase, changes, expected fragment of the one-line error)
    (0, {"lr": 1.0}, "current phase"),
    (9, {"lr": 1.0}, "does not exist"),
    ("2", {"lr": 1.0}, "must be an integer"),
    (2, {"bogus": 1}, "unknown phase key"),
    (2, {}, "non-empty"),
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "os.system"}}}, "outside the allowed prefixes"),
    (2, {"new_optimizer": {"optimizer_init": {"class_path": "builtins.eval"}}}, "outside the allowed prefixes"),
    (2, {"params": ["model.classifier.weight"]}, "more than one phase"),
    # phase 2 still holds it: the refusal says how a move is done
    (1, {"params": ["model.deberta.encoder.rel_embeddings.weight"]},
     "phases must be disjoint; to move parameters to another phase, first queue an edit that takes them out of the "
     "phase that holds them"),
    (2, {"params": ["model\\.nothing.*"]}, "matches no parameter"),
    (2, {"params": ["model.(unclosed"]}, "regex"),
    (2, {"lr": "fast"}, "finite, non-negative float"),
    (2, {"new_lr_scheduler": {"init_pg_lrs": "lots"}}, "init_pg_lrs"),
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"T_0": -3}}}}, "failed"),
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.SGD"}}}, "not a torch LR scheduler"),
    (1, {"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"}}},
     "monitor"),
    # builds and takes a first step, then fails at step 2: caught by the type check, not left to the transition
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                    "init_args": {"step_size": 2, "gamma": "abc"}}}},
     "lr_scheduler_init.init_args.gamma = 'abc': StepLR takes a finite number"),
    (2, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"gamma": -1.0}}}}, "sets group 0's lr to -"),
    # an unmatched pattern comes with the class and argument problems, in one reply
    (2, {"params": ["model\\.nothing.*"],
         "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                    "init_args": {"step_size": 2, "gamma": "abc"}}}},
     "matches no parameter of the model; phase 2: new_lr_scheduler.lr_scheduler_init.init_args.gamma = 'abc'"),
]


def merged_schedule() -> dict[int, dict[str, Any]]:
    """The YAML the accepted (not cancelled) edits amount to."""
    sched = copy.deepcopy(SCHEDULE)
    for i, (phase, changes) in enumerate(ACCEPTED):
        if i != 2:
            sched[phase] = merge_phase(sched[phase], changes)
    return sched


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("edits")
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        out: dict[str, Any] = {"base": base}
        cfg_a = write_config(base, SCHEDULE, step_delay=0.08, name="a", extra_trainer={"max_epochs": 6})
        a = start_daemon(configs=[str(cfg_a)], run="edit-a", run_dir=base / "a")
        replies: dict[str, Any] = {"accepted": [], "rejected": [], "malformed": []}
        with Follower(a.pub, a.ctl) as follower, Control(a.ctl) as ctl:
            for kind, item in follower.follow(timeout=60):
                if kind == "event" and item.kind == ev.LR:
                    break
            assert ctl.request("hello")["phase"] == 0
            for phase, changes in ACCEPTED:
                replies["accepted"].append(ctl.request("queue_edit", phase=phase, changes=changes))
            replies["cancel"] = ctl.request("cancel_edit", edit_id="e3")
            try:
                ctl.request("cancel_edit", edit_id="e1")
            except ControlError as err:
                replies["cancel_needed"] = str(err)
            for phase, changes, _ in REJECTED:
                try:
                    ctl.request("queue_edit", phase=phase, changes=changes)
                    replies["rejected"].append(None)
                except ControlError as err:
                    replies["rejected"].append(str(err))
            for bad in (b"{", ev.dumps({"id": 1, "op": "queue_edit", "phase": 2, "changes": {"lr": 1}, "x": 1}),
                        ev.dumps({"id": 2, "op": "cancel_edit", "edit_id": "e1", "extra": [1] * 10})):
                ctl.sock.send(bad)
                assert ctl.sock.poll(5000)
                replies["malformed"].append(json.loads(ctl.sock.recv()))
            try:
                ctl.request("cancel_edit", edit_id="e3")
            except ControlError as err:
                replies["cancel_again"] = str(err)
            replies["list"] = ctl.request("list_edits")["edits"]
            replies["plan"] = ctl.request("plan", phase=2, changes={"lr": 1.0e-3})
            replies["plan_full"] = ctl.request("plan")
            replies["plan_sampled"] = ctl.request("plan", max_steps=5)
            kept = runner.PLAN_HORIZON_STEPS
            runner.PLAN_HORIZON_STEPS = 9  # the op simulates whole epochs up to its horizon (here: 3 of 6)
            try:
                replies["plan_horizon"] = ctl.request("plan")
            finally:
                runner.PLAN_HORIZON_STEPS = kept
            try:
                ctl.request("plan", max_steps="all")
            except ControlError as err:
                replies["plan_bad"] = str(err)
        assert a.join() == 0
        out["a"] = a
        out["replies"] = replies

        cfg_b = write_config(base, merged_schedule(), step_delay=0.04, name="b", extra_trainer={"max_epochs": 6})
        out["cfg_b"] = cfg_b
        b = start_daemon(configs=[str(cfg_b)], run="edit-b", run_dir=base / "b", history_points=100000)
        wait_for(lambda: (b.daemon.bus.history.step or 0) >= 9, timeout=60)
        late: list[tuple[str, Any]] = []
        with Follower(b.pub, b.ctl) as follower:
            for kind, item in follower.follow(timeout=60):
                late.append((kind, item))
                if kind == "event" and item.kind == ev.STATE and item.data["state"] in ("finished", "failed"):
                    break
        assert b.join() == 0
        out["b"] = b
        out["late"] = late
        out["weights_b"] = {k: v.clone() for k, v in b.daemon.trainer.lightning_module.state_dict().items()}
        yield out


def test_accepted_edits_are_queued_merged_and_cancellable(runs: dict) -> None:
    replies = runs["replies"]
    assert [r["id"] for r in replies["accepted"]] == ["e1", "e2", "e3", "e4", "e5"]
    assert all(r["status"] == "queued" for r in replies["accepted"])
    assert replies["cancel"]["status"] == "cancelled"
    assert "only queued edits can be cancelled" in replies["cancel_again"]
    # e5 sets gamma, which the phase's own CosineAnnealingWarmRestarts does not take: e1 stays
    # what to do comes first (e5, not e2, which does not build on e1), then why
    assert replies["cancel_needed"].startswith("edit e1 cannot be cancelled alone; cancel e5 first: the queued edits "
                                               "left would not validate ("), replies["cancel_needed"]
    assert "unexpected keyword argument 'gamma'" in replies["cancel_needed"]
    statuses = {e["id"]: (e["status"], e["applied_step"]) for e in replies["list"]}
    assert statuses == {"e1": ("queued", None), "e2": ("queued", None), "e3": ("cancelled", None),
                        "e4": ("queued", None), "e5": ("queued", None)}


def test_rejected_edits_and_malformed_messages_change_nothing(runs: dict) -> None:
    for (phase, _, fragment), err in zip(REJECTED, runs["replies"]["rejected"]):
        assert err is not None, f"edit to phase {phase} was accepted"
        assert fragment in err and "\n" not in err, (fragment, err)
    malformed = runs["replies"]["malformed"]
    assert malformed[0]["ok"] is False and malformed[0]["id"] is None
    assert "unknown argument 'x'" in malformed[1]["error"]
    assert "cancel_edit takes edit_id; unknown argument 'extra'" in malformed[2]["error"]
    # only the five accepted edits exist anywhere: list, journal, events
    assert len(runs["replies"]["list"]) == 5
    journal = Journal(runs["base"] / "a" / "edits.jsonl").read()
    assert sorted({r["edit"]["id"] for r in journal if r["type"] == "queued"}) == ["e1", "e2", "e3", "e4", "e5"]
    final = replay_journal(journal)
    assert {k: e.status for k, e in final.items()} == {"e1": "applied", "e2": "applied", "e3": "cancelled",
                                                       "e4": "applied", "e5": "applied"}
    events = read_events(runs["base"] / "a" / "events.jsonl")
    rejected = [e for e in events if e.kind == ev.EDIT and e.data["edit"]["status"] == "rejected"]
    assert len(rejected) == len(REJECTED)


def test_edit_queued_mid_run_equals_the_yaml(runs: dict) -> None:
    a_events = read_events(runs["base"] / "a" / "events.jsonl")
    b_events = read_events(runs["base"] / "b" / "events.jsonl")
    lr_a, lr_b = lr_by_step(a_events), lr_by_step(b_events)
    assert len(lr_a) == 24 and lr_a == lr_b  # exactly, step by step, every group
    loss_a = {e.step: e.data["metrics"]["train_loss"] for e in a_events if e.kind == ev.METRIC and
              "train_loss" in e.data["metrics"]}
    loss_b = {e.step: e.data["metrics"]["train_loss"] for e in b_events if e.kind == ev.METRIC and
              "train_loss" in e.data["metrics"]}
    assert loss_a == loss_b
    trans_a = [e.data for e in a_events if e.kind == ev.TRANSITION]
    trans_b = [e.data for e in b_events if e.kind == ev.TRANSITION]
    assert [t["scheduler"] for t in trans_a] == [t["scheduler"] for t in trans_b]
    assert trans_a[1]["scheduler"]["lr_scheduler_init"] == EXP_MERGED  # class changed: T_0/T_mult/eta_min dropped
    assert trans_a[0]["scheduler"]["lr_scheduler_init"]["init_args"] == {"step_size": 1, "gamma": 0.6}
    applied = {e.data["edit"]["id"]: e.data["edit"] for e in a_events if e.kind == ev.EDIT and
               e.data["edit"]["status"] == "applied"}
    assert sorted(applied) == ["e1", "e2", "e4", "e5"]
    assert applied["e4"]["applied_step"] == 8 and applied["e1"]["applied_step"] == 16
    effective = yaml.safe_load((runs["base"] / "a" / "schedule_effective.yaml").read_text())
    assert effective[2]["new_lr_scheduler"]["lr_scheduler_init"] == EXP_MERGED and effective[2]["lr"] == 4.0e-3
    assert effective[1]["max_transition_epoch"] == 4  # e3 (cancelled) never applied
    # and the copy the callback keeps in its log_dir, where FTS writes it (it was written once, before any edit)
    (logged,) = (runs["base"] / "a").glob("lightning_logs/version_*/*_ft_schedule_effective.yaml")
    in_log_dir = yaml.safe_load(logged.read_text())
    assert in_log_dir[2]["new_lr_scheduler"]["lr_scheduler_init"] == EXP_MERGED and in_log_dir[2]["lr"] == 4.0e-3
    assert in_log_dir[1]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"]["gamma"] == 0.6
    # the schedule events carried the queued edits per phase while they were pending
    sched = [e.data for e in a_events if e.kind == ev.SCHEDULE and e.data["phases"][2]["edits"]]
    assert {x["id"] for x in sched[-1]["phases"][2]["edits"]} == {"e1", "e2", "e5"}


def test_plan_op_previews_an_edit(runs: dict) -> None:
    plan = runs["replies"]["plan"]
    assert set(plan) >= {"steps", "epochs", "phases", "series", "phase_starts"}
    assert [p["phase"] for p in plan["phase_starts"]] == [0, 1, 2]
    assert plan["stride"] == 1 and plan["total_steps"] == len(plan["steps"])
    # a plan longer than max_steps comes sampled, with every phase's first step and the last one
    small = runs["replies"]["plan_sampled"]
    assert small["total_steps"] == plan["total_steps"] and small["stride"] > 1
    starts = {p["step"] for p in small["phase_starts"]}
    assert starts | {plan["total_steps"] - 1} <= set(small["steps"]) and len(small["steps"]) <= 5 + len(starts) + 1
    assert all(len(v) == len(small["steps"]) for v in small["series"].values())
    assert "`max_steps` must be an integer >= 2" in runs["replies"]["plan_bad"]
    assert plan["horizon_epochs"] is None
    short = runs["replies"]["plan_horizon"]
    assert short["horizon_epochs"] == 3 and short["total_steps"] == 12 and short["steps"] == list(range(12))
    full = runs["replies"]["plan_full"]["series"]
    assert short["series"] == {tag: full[tag][:12] for tag in short["series"]}  # the whole run's first 3 epochs
    assert all(set(full[tag][:12]) == {None} for tag in set(full) - set(short["series"]))  # groups of later phases


def test_event_log_is_gap_free_with_a_full_lifecycle(runs: dict) -> None:
    events = read_events(runs["base"] / "a" / "events.jsonl")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.daemon for e in events}) == 1 and all(e.run == "edit-a" for e in events)
    states = [e.data["state"] for e in events if e.kind == ev.STATE]
    assert states[0] == "starting" and states[-1] == "finished" and states.count("transition") == 2
    assert events[-1].data["reason"] == "completed"
    lr_steps = [e.step for e in events if e.kind == ev.LR]
    assert lr_steps == list(range(24))
    val = [e for e in events if e.kind == ev.METRIC and e.data["stage"] == "val"]
    assert len(val) == 6 and all({"val_loss", "val_acc"} <= set(e.data["metrics"]) for e in val)


def test_late_subscriber_snapshot_then_gap_free_stream(runs: dict) -> None:
    late = runs["late"]
    kind, snap = late[0]
    assert kind == "snapshot" and snap["state"] == "training" and snap["step"] >= 9
    assert snap["schedule"]["phases"][0]["index"] == 0
    stream = [item for kind, item in late[1:] if kind == "event"]
    assert [k for k, _ in late].count("snapshot") == 1
    seqs = [e.seq for e in stream]
    assert seqs == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(seqs)))
    # snapshot history + live events reproduce the durable record exactly
    rebuilt: dict[str, dict[int, float]] = {}
    for tag, points in snap["lr"].items():
        for step, value in points:
            rebuilt.setdefault(tag, {})[step] = value
    for event in stream:
        if event.kind == ev.LR:
            for tag, value in event.data["lrs"].items():
                rebuilt.setdefault(tag, {})[event.step] = value
    durable: dict[str, dict[int, float]] = {}
    for event in read_events(runs["base"] / "b" / "events.jsonl"):
        if event.kind == ev.LR:
            for tag, value in event.data["lrs"].items():
                durable.setdefault(tag, {})[event.step] = value
    assert rebuilt == durable


def test_tensorboard_lr_logs_match_the_events(runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["base"] / "b"
    event_files = list(run_dir.rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard logs in the run dir"
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    lrs = lr_by_step(read_events(run_dir / "events.jsonl"))
    tags = {tag for values in lrs.values() for tag in values}
    assert tags <= set(acc.Tags()["scalars"])
    for tag in tags:
        for point in acc.Scalars(tag):
            assert point.value == pytest.approx(lrs[point.step][tag], rel=1e-6)


def test_train_metric_events_are_the_points_tensorboard_got(runs: dict) -> None:
    """Train metrics are read after Lightning computed them for its loggers: the same points, the same values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["base"] / "b"
    acc = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent), size_guidance={"scalars": 0})
    acc.Reload()
    # TensorBoard's step is Lightning's count of batches that stepped before this one; events carry global_step
    logged = {p.step + 1: p.value for p in acc.Scalars("train_loss")}
    published = {e.step: e.data["metrics"]["train_loss"] for e in read_events(run_dir / "events.jsonl")
                 if e.kind == ev.METRIC and e.data["stage"] == "train" and "train_loss" in e.data["metrics"]}
    assert len(logged) >= 20 and set(published) == set(logged)
    for step, value in logged.items():
        assert published[step] == pytest.approx(value, rel=1e-6), step


def test_publishing_does_not_change_training(runs: dict, tmp_path: Path) -> None:
    from fts_daemon.runner import build_from_config, resolve_schedule_path

    built = build_from_config([runs["cfg_b"]], trainer_defaults={"default_root_dir": str(tmp_path)})
    from fts_daemon.runner import find_fts_callback

    resolve_schedule_path(find_fts_callback(built.trainer), [runs["cfg_b"]])
    built.trainer.fit(built.model, datamodule=built.datamodule)
    plain = built.trainer.lightning_module.state_dict()
    assert plain.keys() == runs["weights_b"].keys()
    for key, value in plain.items():
        assert torch.equal(value, runs["weights_b"][key]), key


def test_merge_rules() -> None:
    base = copy.deepcopy(SCHEDULE[2])
    merged = merge_phase(base, {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"T_0": 5}},
                                                     "init_pg_lrs": [1.0]}})
    assert merged["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] == {"T_0": 5, "T_mult": 2, "eta_min": 1.0e-5}
    assert merged["new_lr_scheduler"]["init_pg_lrs"] == [1.0]  # lists replace
    assert merged["new_lr_scheduler"]["pl_lrs_cfg"] == base["new_lr_scheduler"]["pl_lrs_cfg"]
    swapped = merge_phase(base, {"new_lr_scheduler": {"lr_scheduler_init": EXP}})
    assert swapped["new_lr_scheduler"]["lr_scheduler_init"] == EXP  # a new class drops the old class's args
    assert "new_lr_scheduler" not in merge_phase(base, {"new_lr_scheduler": None})  # null removes
    assert "init_pg_lrs" not in merge_phase(base, {"new_lr_scheduler": {"init_pg_lrs": None}})["new_lr_scheduler"]
    assert merge_phase(base, {"params": ["x"]})["params"] == ["x"]
    assert base == SCHEDULE[2]  # inputs are never mutated
    added = merge_phase({"params": ["a"]}, {"new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD"}}})
    assert added["new_optimizer"] == {"optimizer_init": {"class_path": "torch.optim.SGD"}}
