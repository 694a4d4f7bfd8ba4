"""Implicit mode (a generated schedule with ``reinit_lr_cfg``) through the daemon, its events and the TUI's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fts_daemon import events as ev
from fts_daemon.client import Control, ControlError, Follower
from fts_tui.state import RunState

from .daemon_support import private_runtime_dir, read_events, start_daemon

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def implicit_config(directory: Path) -> Path:
    """The implicit demo, fast, with phases that end on patience every two epochs (no val_loss improves by 0.5)."""
    config = yaml.safe_load((CONFIGS / "demo_implicit_reinit_lr.yaml").read_text())
    config["model"]["init_args"]["step_delay"] = 0.02
    config["data"]["init_args"]["num_train"] = 128
    config["trainer"]["max_epochs"] = 6
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("FTSEarlyStopping"):
            cb["init_args"]["min_delta"] = 0.5
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "implicit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def implicit_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("implicit")
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        running = start_daemon(configs=[str(implicit_config(base))], run="imp", run_dir=base / "run")
        refusals = []
        with Follower(running.pub, running.ctl) as follower, Control(running.ctl) as ctl:
            for kind, item in follower.follow(timeout=60):
                if kind == "event" and item.kind == ev.LR:
                    break
            for changes in ({"new_lr_scheduler": None}, {"new_optimizer": None},
                            {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"gamma": 0.5}}}}):
                try:
                    ctl.request("queue_edit", phase=2, changes=changes)
                    refusals.append(None)
                except ControlError as err:
                    refusals.append(str(err))
            edits = ctl.request("list_edits")["edits"]
        assert running.join() == 0, running.daemon.error
    return {"events": read_events(base / "run" / "events.jsonl"), "refusals": refusals, "edits": edits}


def test_edits_of_the_reinit_blocks_are_refused_in_implicit_mode(implicit_run: dict) -> None:
    """``reinit_lr_cfg`` applies at every phase; a per-phase block, or removing one (null), would change nothing: an
    edit that is accepted and "applied" while doing nothing is worse than a refusal."""
    lr_refusal, optim_refusal, args_refusal = implicit_run["refusals"]
    assert lr_refusal is not None and "new_lr_scheduler cannot be edited: this run sets reinit_lr_cfg" in lr_refusal
    assert args_refusal is not None and "reinit_lr_cfg" in args_refusal
    assert optim_refusal is None  # no reinit_optim_cfg here: removing a phase's (absent) new_optimizer is allowed
    assert [e["changes"] for e in implicit_run["edits"]] == [{"new_optimizer": None}]


def test_every_transition_says_it_reinitialized_and_the_tui_shows_the_implicit_scheduler(implicit_run: dict) -> None:
    events = implicit_run["events"]
    transitions = [e for e in events if e.kind == ev.TRANSITION and e.data["from"] is not None]
    assert len(transitions) >= 2 and [t.data["to"] for t in transitions] == list(range(1, len(transitions) + 1))
    # the spec in force is the same at each transition; each one still built a new scheduler
    assert all(t.data["scheduler_reinit"] and not t.data["optimizer_reinit"] for t in transitions)
    assert all(t.data["scheduler"] == transitions[0].data["scheduler"] for t in transitions)
    schedule = next(e for e in events if e.kind == ev.SCHEDULE)
    assert schedule.data["reinit_lr_cfg"]["lr_scheduler_init"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert schedule.data["reinit_optim_cfg"] is None

    state = RunState(tolerant=True)
    state.load_events(events)
    reinit_lines = [e.text for e in state.log if e.kind == "scheduler"]
    assert len(reinit_lines) == len(transitions), reinit_lines  # one per transition (it used to be the first only)
    for phase in (1, 2, 5):  # phase 5 never runs (max_depth 4): it would get the same
        summary, here = state.scheduler_in_force(phase)
        assert summary.startswith("StepLR(") and here, (phase, summary)
    assert "(initial)" in state.scheduler_in_force(0)[0]
