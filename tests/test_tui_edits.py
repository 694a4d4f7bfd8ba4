"""The edit form's fields → ``queue_edit`` changes: only what changed, as a patch the daemon's merge understands."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fts_daemon.edits import merge_phase
from fts_tui.edits import (
    NO_SCHEDULER,
    FormError,
    build_changes,
    default_init_args,
    effective_phase,
    fields_from_phase,
    group_hint,
    merge_patch,
    parse_init_pg_lrs,
)
from fts_tui.state import EditInfo, PhaseInfo, RunState
from tests.data.make_recordings import build_run

STEP = "torch.optim.lr_scheduler.StepLR"
PHASE = {
    "index": 2,
    "state": "pending",
    "params": ["encoder.layer.4.output.dense.weight", "encoder.layer.4.output.dense.bias"],
    "lr": 1e-05,
    "max_transition_epoch": 12,
    "new_lr_scheduler": {
        "lr_scheduler_init": {"class_path": STEP, "init_args": {"step_size": 1, "gamma": 0.7}},
        "pl_lrs_cfg": {"interval": "epoch", "name": "X"},
        "init_pg_lrs": [2e-06, 1.2345678e-06],
    },
}


def phase() -> PhaseInfo:
    return PhaseInfo.from_dict(copy.deepcopy(PHASE))


def merged(p: PhaseInfo, changes: dict[str, Any]) -> dict[str, Any]:
    return merge_phase(p.to_changes_base(), changes)


def test_untouched_form_sends_nothing() -> None:
    p = phase()
    f = fields_from_phase(p)
    assert f.lr == "1e-05" and f.init_pg_lrs == "[2e-06, 1.2345678e-06]"  # exact: no rounding makes a fake change
    assert f.scheduler == STEP and f.init_args == "step_size: 1\ngamma: 0.7"
    assert build_changes(f, p) == {}


def test_changes_are_patches_the_daemon_merges_into_what_the_form_shows() -> None:
    p = phase()
    f = fields_from_phase(p)
    f.lr, f.init_args, f.init_pg_lrs = "5e-6", "step_size: 2", ""
    changes = build_changes(f, p)
    # a removed init arg / init_pg_lrs travel as null: the daemon's merge is key-wise
    assert changes == {"lr": 5e-06, "new_lr_scheduler": {"init_pg_lrs": None, "lr_scheduler_init": {"init_args": {"gamma": None, "step_size": 2}}}}
    assert merged(p, changes)["new_lr_scheduler"] == {
        "lr_scheduler_init": {"class_path": STEP, "init_args": {"step_size": 2}},
        "pl_lrs_cfg": {"interval": "epoch", "name": "X"},
    }
    f.scheduler, f.init_args = "torch.optim.lr_scheduler.ExponentialLR", "gamma: 0.9"
    m = merged(p, build_changes(f, p))
    assert m["new_lr_scheduler"]["lr_scheduler_init"] == {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.9}}
    f.scheduler, f.init_args, f.pl_lrs_cfg = NO_SCHEDULER, "", ""
    assert build_changes(f, p)["new_lr_scheduler"] is None
    assert "new_lr_scheduler" not in merged(p, build_changes(f, p))
    f.params = "a\nb\n\n  c  "
    assert build_changes(f, p)["params"] == ["a", "b", "c"]


def test_local_field_errors() -> None:
    p = phase()
    cases = {
        "lr": ("x", "lr: 'x' is not a number"),
        "max_transition_epoch": ("1.5", "max_transition_epoch: '1.5' is not an integer"),
        # what is wrong and where, not PyYAML's first line ("while parsing a flow sequence")
        "init_args": ("[1, 2", "init_args: invalid YAML: expected ',' or ']', but got the end (line 1, column 6)"),
        "pl_lrs_cfg": ("- a", "pl_lrs_cfg: expected a mapping"),
        "init_pg_lrs": ("[1e-6, nope]", "init_pg_lrs[1]: 'nope' is not a number"),
        "params": ("", "params: a phase needs at least one"),
    }
    for field, (value, message) in cases.items():
        f = fields_from_phase(p)
        setattr(f, field, value)
        with pytest.raises(FormError, match=re.escape(message)):
            build_changes(f, p)
    f = fields_from_phase(p)
    f.scheduler = NO_SCHEDULER
    with pytest.raises(FormError, match="pick a scheduler class"):
        build_changes(f, p)
    assert parse_init_pg_lrs("1e-6, 2e-6") == [1e-06, 2e-06] and parse_init_pg_lrs("  ") is None


def test_group_hint_and_defaults() -> None:
    groups = ["phase0", "phase1", "phase2"]
    assert group_hint(groups, "") == "3 groups in this phase: phase0, phase1, phase2"
    assert group_hint(groups, "[1e-6]").endswith("1 value(s): phase1, phase2 keep their current lr")
    assert group_hint(groups, "1e-6, 1e-6, 1e-6, 1e-6").endswith("1 extra (ignored by FTS)")
    assert group_hint(groups, "1e-6, 1e-6, 1e-6").endswith("one value per group")
    assert group_hint([], "").startswith("group count unknown")
    assert default_init_args("torch.optim.lr_scheduler.CosineAnnealingWarmRestarts") == "T_0: 3\nT_mult: 2\neta_min: 1.0e-07"


def test_effective_phase_merges_queued_edits_in_order() -> None:
    s = RunState()
    from tests.test_tui_state import daemon_snapshot

    s.apply_snapshot(daemon_snapshot(build_run()[:460]))  # e1 and e2 both queued for phase 3
    eff = effective_phase(s, 3)
    assert eff is not None and eff.lr == 3e-05  # e2 (later) overrides e1's lr
    assert eff.new_lr_scheduler["lr_scheduler_init"]["class_path"].endswith("ExponentialLR")
    s.store_edit(EditInfo(id="e2", phase=3, changes={"lr": 3e-05}, status="cancelled"))
    assert effective_phase(s, 3).lr == 5e-06
    assert effective_phase(s, 9) is None


json_scalars = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=3))
blocks = st.recursive(json_scalars, lambda inner: st.dictionaries(st.sampled_from("abcd"), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcde"), blocks, max_size=4), st.dictionaries(st.sampled_from("abcde"), blocks, max_size=4))
def test_merge_patch_round_trips_through_the_daemons_merge(old: dict, new: dict) -> None:
    base = {"params": ["p"], "new_lr_scheduler": old}
    patch = merge_patch(old, new)
    assert merge_phase(base, {"new_lr_scheduler": patch})["new_lr_scheduler"] == new
