"""The edit form's fields ↔ the ``changes`` of a ``queue_edit`` request (pure, no Textual).

The form starts from the phase as it will run: the schedule's phase with the edits already queued for it merged in
(the daemon merges edits to one phase in order, with :func:`fts_daemon.edits.merge_phase`). Only what the user
changed is sent, as a patch in that merge's terms: top-level keys replace, ``new_lr_scheduler`` merges key by key
(``null`` removes a key), so removing ``init_pg_lrs`` or an init arg is sent as ``null``. Everything here is a local,
syntactic check; the daemon validates the edit for real (class allowlist, dry run, group counts) and its one-line
reason is what the form shows when it says no.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fts_daemon.edits import merge_phase
from fts_tui.state import PhaseInfo, RunState

NO_SCHEDULER = "(no reinit in this phase)"

# Starting init_args offered when the user picks a class (edit freely before sending).
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "StepLR": {"step_size": 1, "gamma": 0.7},
    "MultiStepLR": {"milestones": [2, 4], "gamma": 0.5},
    "ExponentialLR": {"gamma": 0.9},
    "CosineAnnealingLR": {"T_max": 4, "eta_min": 1.0e-07},
    "CosineAnnealingWarmRestarts": {"T_0": 3, "T_mult": 2, "eta_min": 1.0e-07},
    "ConstantLR": {"factor": 0.5, "total_iters": 2},
    "LinearLR": {"start_factor": 0.1, "total_iters": 4},
    "ReduceLROnPlateau": {"mode": "min", "factor": 0.5, "patience": 1},
}


class FormError(ValueError):
    """A field that cannot be read (one line, names the field)."""


@dataclass
class FormFields:
    lr: str = ""
    max_transition_epoch: str = "-1"
    scheduler: str = NO_SCHEDULER  # class_path, or NO_SCHEDULER
    init_args: str = ""
    pl_lrs_cfg: str = ""
    init_pg_lrs: str = ""
    params: str = ""


def yaml_inline(value: Any) -> str:
    if value in (None, {}, []):
        return ""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000).strip()


def yaml_block(value: Any) -> str:
    if not value:
        return ""
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=False).strip()


def fields_from_phase(phase: PhaseInfo) -> FormFields:
    sched = phase.new_lr_scheduler or {}
    init = sched.get("lr_scheduler_init") or {}
    pg = sched.get("init_pg_lrs")
    return FormFields(
        lr="" if phase.lr is None else str(phase.lr),  # str(float) round-trips exactly
        max_transition_epoch=str(phase.max_transition_epoch),
        scheduler=str(init.get("class_path") or NO_SCHEDULER),
        init_args=yaml_block(init.get("init_args")),
        pl_lrs_cfg=yaml_inline(sched.get("pl_lrs_cfg")),
        init_pg_lrs="" if not pg else "[" + ", ".join(str(v) for v in pg) + "]",
        params="\n".join(phase.params),
    )


def default_init_args(class_path: str) -> str:
    return yaml_block(SCHEDULER_DEFAULTS.get(class_path.rsplit(".", 1)[-1], {}))


def _load_yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        # PyYAML's first line is often only the context ("while parsing a flow sequence"): say what and where
        problem = getattr(err, "problem", None)
        mark = getattr(err, "problem_mark", None)
        if problem:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = problem.replace("'<stream end>'", "the end")
            raise FormError(f"{what}: invalid YAML: {problem}{where}") from None
        first = str(err).splitlines()[0] if str(err) else "invalid YAML"
        raise FormError(f"{what}: {first}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise FormError(f"{what}: must be a finite number ≥ 0, got {text}")
    return value


def parse_init_pg_lrs(text: str) -> list[float] | None:
    if not text.strip():
        return None
    raw = _load_yaml(text if text.strip().startswith("[") else f"[{text}]", "init_pg_lrs")
    if not isinstance(raw, list) or not raw:
        raise FormError("init_pg_lrs: expected a list of learning rates, e.g. [1e-6, 2e-6]")
    return [_float(str(v), f"init_pg_lrs[{i}]") for i, v in enumerate(raw)]


def parse_scheduler_block(fields: FormFields) -> dict[str, Any] | None:
    init_args = _load_yaml(fields.init_args, "init_args")
    pl_lrs_cfg = _load_yaml(fields.pl_lrs_cfg, "pl_lrs_cfg")
    init_pg_lrs = parse_init_pg_lrs(fields.init_pg_lrs)
    if fields.scheduler == NO_SCHEDULER:
        if init_args or pl_lrs_cfg or init_pg_lrs:
            raise FormError("init_args, pl_lrs_cfg and init_pg_lrs belong to a scheduler reinit: pick a scheduler class")
        return None
    if init_args is not None and not isinstance(init_args, Mapping):
        raise FormError("init_args: expected a mapping, e.g. {step_size: 1, gamma: 0.7}")
    if pl_lrs_cfg is not None and not isinstance(pl_lrs_cfg, Mapping):
        raise FormError("pl_lrs_cfg: expected a mapping, e.g. {interval: epoch, name: my_lrs}")
    block: dict[str, Any] = {"lr_scheduler_init": {"class_path": fields.scheduler, "init_args": dict(init_args or {})}}
    if pl_lrs_cfg:
        block["pl_lrs_cfg"] = dict(pl_lrs_cfg)
    if init_pg_lrs is not None:
        block["init_pg_lrs"] = init_pg_lrs
    return block


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The patch that :func:`~fts_daemon.edits.merge_phase`'s block merge turns ``old`` into ``new`` with."""
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            # a new class_path drops the old init_args in the merge, so the block then travels whole
            same_class = value.get("class_path") == before.get("class_path")
            out[key] = merge_patch(before, value) if same_class else dict(value)
        else:
            out[key] = value
    return out


def effective_phase(state: RunState, index: int) -> PhaseInfo | None:
    """Phase ``index`` with the edits queued for it merged in order (what will run if nothing else changes)."""
    phase = state.phase_info(index)
    if phase is None:
        return None
    merged = phase.to_changes_base()
    for edit in sorted(state.pending_edits(index), key=lambda e: e.created or 0.0):
        merged = merge_phase(merged, edit.changes)
    return PhaseInfo.from_dict({"index": index, "state": phase.state, **merged})


def build_changes(fields: FormFields, phase: PhaseInfo) -> dict[str, Any]:
    """The keys that differ from ``phase``; raises :class:`FormError` on a field that cannot be read."""
    changes: dict[str, Any] = {}
    if fields.lr.strip():
        lr = _float(fields.lr.strip(), "lr")
        if phase.lr is None or not math.isclose(lr, float(phase.lr), rel_tol=1e-9, abs_tol=0.0):
            changes["lr"] = lr
    try:
        mte = int(fields.max_transition_epoch.strip() or "-1")
    except ValueError:
        raise FormError(f"max_transition_epoch: {fields.max_transition_epoch!r} is not an integer") from None
    if mte < -1:
        raise FormError("max_transition_epoch: -1 (early stopping only) or an epoch ≥ 0")
    if mte != phase.max_transition_epoch:
        changes["max_transition_epoch"] = mte
    block = parse_scheduler_block(fields)
    old = phase.new_lr_scheduler
    if block is None:
        if old:
            changes["new_lr_scheduler"] = None
    elif not old:
        changes["new_lr_scheduler"] = block
    else:
        patch = merge_patch(old, block)
        if patch:
            changes["new_lr_scheduler"] = patch
    params = [line.strip() for line in fields.params.splitlines() if line.strip()]
    if not params and phase.params:
        raise FormError("params: a phase needs at least one parameter name or pattern")
    if params != list(phase.params):
        changes["params"] = params
    return changes


def group_hint(groups: Sequence[str], init_pg_lrs_text: str) -> str:
    """What the form says under ``init_pg_lrs``: how many groups the phase will have and how the list maps."""
    if not groups:
        return "group count unknown (the daemon checks the list length)"
    names = ", ".join(groups)
    base = f"{len(groups)} group{'s' if len(groups) != 1 else ''} in this phase: {names}"
    try:
        values = parse_init_pg_lrs(init_pg_lrs_text)
    except FormError:
        return base
    if values is None:
        return base
    if len(values) < len(groups):
        rest = ", ".join(groups[len(values) :])
        return f"{base} — {len(values)} value(s): {rest} keep their current lr"
    if len(values) > len(groups):
        return f"{base} — {len(values)} values: {len(values) - len(groups)} extra (ignored by FTS)"
    return f"{base} — one value per group"
