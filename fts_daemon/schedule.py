"""Fine-tuning schedules: load, parse, validate (the parts that need no torch), generate and dump.

A schedule is an ordered list of phases. Phase 0 is what ``configure_optimizers`` trains; each later phase thaws
more parameters, may set the ``lr`` of the groups it adds, and may reinitialize the LR scheduler or the optimizer.
The YAML shape is finetuning-scheduler's, unchanged, so existing schedules load as they are.

This module is pure: no torch, no Lightning, no sockets. Everything that needs torch (class import, dry runs,
group simulation against a real optimizer) lives in :mod:`fts_daemon.validation` and :mod:`fts_daemon.reinit`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

PHASE_KEYS = ("params", "max_transition_epoch", "lr", "new_lr_scheduler", "new_optimizer")
LR_SCHEDULER_KEYS = ("lr_scheduler_init", "pl_lrs_cfg", "init_pg_lrs", "use_current_optimizer_pg_lrs")
OPTIMIZER_KEYS = ("optimizer_init",)
INIT_KEYS = ("class_path", "init_args")
# Fields of Lightning's LRSchedulerConfig that a schedule may set (``scheduler`` and ``opt_idx`` are ours to fill).
PL_LRS_KEYS = ("interval", "frequency", "name", "monitor", "strict", "reduce_on_plateau")

# A YAML document larger than this is refused before parsing (a schedule is a few KiB; this stops YAML bombs and
# accidental multi-GB files from being read at all).
MAX_SCHEDULE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a schedule or config, rendered as a single line."""

    reason: str
    phase: int | None = None
    key: str | None = None
    value: Any = None
    has_value: bool = False

    def __str__(self) -> str:
        where = []
        if self.phase is not None:
            where.append(f"phase {self.phase}")
        if self.key:
            where.append(self.key if not self.has_value else f"{self.key} = {_short_repr(self.value)}")
        prefix = ": ".join(where)
        text = f"{prefix}: {self.reason}" if prefix else self.reason
        return " ".join(text.split())  # one line, always


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problem(reason: str, phase: int | None = None, key: str | None = None, *value: Any) -> Problem:
    """Build a :class:`Problem`; pass ``value`` only when the offending value should be shown."""
    return Problem(reason=reason, phase=phase, key=key, value=value[0] if value else None, has_value=bool(value))


class ScheduleError(ValueError):
    """A schedule (or config, or edit) that cannot be used. ``problems`` holds one line per issue."""

    def __init__(self, problems: Sequence[Problem | str]):
        self.problems = [p if isinstance(p, Problem) else Problem(str(p)) for p in problems]
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class InitSpec:
    """``{class_path, init_args}``: what to import and how to call it."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class_path": self.class_path}
        if self.init_args:
            out["init_args"] = copy.deepcopy(self.init_args)
        return out


@dataclass
class LRSchedulerSpec:
    """A phase's ``new_lr_scheduler`` block (or the implicit ``reinit_lr_cfg``)."""

    lr_scheduler_init: InitSpec
    pl_lrs_cfg: dict[str, Any] = field(default_factory=dict)
    init_pg_lrs: list[float] | None = None
    use_current_optimizer_pg_lrs: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lr_scheduler_init": self.lr_scheduler_init.to_dict()}
        if self.pl_lrs_cfg:
            out["pl_lrs_cfg"] = dict(self.pl_lrs_cfg)
        if self.init_pg_lrs is not None:
            out["init_pg_lrs"] = list(self.init_pg_lrs)
        if self.use_current_optimizer_pg_lrs:
            out["use_current_optimizer_pg_lrs"] = True
        return out


@dataclass
class OptimizerSpec:
    """A phase's ``new_optimizer`` block (or the implicit ``reinit_optim_cfg``)."""

    optimizer_init: InitSpec

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer_init": self.optimizer_init.to_dict()}


@dataclass
class Phase:
    index: int
    params: list[str] = field(default_factory=list)  # as written: names or regexes
    max_transition_epoch: int = -1
    lr: float | None = None  # None in phase 0 (the optimizer's own lr applies)
    new_lr_scheduler: LRSchedulerSpec | None = None
    new_optimizer: OptimizerSpec | None = None
    resolved: list[str] = field(default_factory=list)  # concrete parameter names, filled by resolve_params

    def to_dict(self, resolved: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"params": list(self.resolved if resolved and self.resolved else self.params)}
        out["max_transition_epoch"] = self.max_transition_epoch
        if self.lr is not None:
            out["lr"] = self.lr
        if self.new_lr_scheduler is not None:
            out["new_lr_scheduler"] = self.new_lr_scheduler.to_dict()
        if self.new_optimizer is not None:
            out["new_optimizer"] = self.new_optimizer.to_dict()
        return out


@dataclass
class Schedule:
    phases: list[Phase]

    def __len__(self) -> int:
        return len(self.phases)

    def __getitem__(self, index: int) -> Phase:
        return self.phases[index]

    def to_dict(self, resolved: bool = True) -> dict[int, dict[str, Any]]:
        return {p.index: p.to_dict(resolved=resolved) for p in self.phases}

    def copy(self) -> Schedule:
        return copy.deepcopy(self)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: let the default constructor raise its own error
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


# Nodes a document may expand to once aliases are followed. Real schedules and configs have a few hundred.
MAX_EXPANDED_NODES = 200_000


def _check_alias_expansion(text: str) -> None:
    """Refuse documents whose aliases expand past MAX_EXPANDED_NODES ("billion laughs").

    Composing keeps aliases as shared references (cheap); only construction expands them, so the expanded size is
    counted on the composed graph, with memoization, before anything is constructed.
    """
    if "*" not in text:
        return
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the real load reports the syntax error with its position
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # cycles (recursive aliases) count once; SafeLoader rejects them later anyway
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(n) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[key] = min(total, MAX_EXPANDED_NODES + 1)
        return sizes[key]

    if root is not None and size(root) > MAX_EXPANDED_NODES:
        raise ScheduleError([problem(f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes; refusing a possible alias bomb")])


def parse_yaml_text(text: str | bytes, source: str = "<schedule>") -> Any:
    """Parse YAML safely: UTF-8 only, no duplicate keys, bounded size, no alias bombs."""
    if isinstance(text, bytes):
        if len(text) > MAX_SCHEDULE_BYTES:
            raise ScheduleError([problem(f"{source}: file is {len(text)} bytes, more than {MAX_SCHEDULE_BYTES}")])
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ScheduleError([problem(f"{source}: not UTF-8 text (byte {err.start})")]) from None
    if len(text) > MAX_SCHEDULE_BYTES:
        raise ScheduleError([problem(f"{source}: text is longer than {MAX_SCHEDULE_BYTES} characters")])
    _check_alias_expansion(text)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.constructor.ConstructorError as err:
        mark = f" (line {err.problem_mark.line + 1})" if err.problem_mark else ""
        raise ScheduleError([problem(f"{source}: {err.problem}{mark}")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ScheduleError([problem(f"{source}: invalid YAML{where}: {what}")]) from None


def load_schedule_file(path: str | os.PathLike[str]) -> Any:
    """Read a schedule YAML file into plain Python data (not yet validated)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCHEDULE_BYTES + 1)
    except FileNotFoundError:
        raise ScheduleError([problem(f"schedule file not found: {os.fspath(path)}")]) from None
    except OSError as err:
        raise ScheduleError([problem(f"cannot read schedule file {os.fspath(path)}: {err.strerror}")]) from None
    return parse_yaml_text(data, source=os.fspath(path))


# --------------------------------------------------------------------------------------------------------------
# Parsing (structure and types)
# --------------------------------------------------------------------------------------------------------------


def as_lr(value: Any) -> float | None:
    """A usable learning rate as float, or None: finite, >= 0, not a bool. Numeric strings are accepted as FTS does."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(out) or out < 0:
        return None
    return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _parse_init(raw: Any, phase: int | None, key: str, problems: list[Problem]) -> InitSpec | None:
    if not isinstance(raw, Mapping):
        problems.append(problem("must be a mapping with `class_path` and optional `init_args`", phase, key, raw))
        return None
    for k in raw:
        if k not in INIT_KEYS:
            problems.append(problem(f"unknown key (expected one of {', '.join(INIT_KEYS)})", phase, f"{key}.{k}"))
    class_path = raw.get("class_path")
    if not isinstance(class_path, str) or not class_path.strip():
        problems.append(problem("a `class_path` string is required", phase, f"{key}.class_path", class_path))
        return None
    init_args = raw.get("init_args", {})
    if init_args is None:
        init_args = {}
    if not isinstance(init_args, Mapping) or not all(isinstance(k, str) for k in init_args):
        problems.append(problem("must be a mapping of argument names to values", phase, f"{key}.init_args", init_args))
        return None
    return InitSpec(class_path=class_path.strip(), init_args=copy.deepcopy(dict(init_args)))


def parse_lr_scheduler_spec(
    raw: Any, phase: int | None, key: str = "new_lr_scheduler", implicit: bool = False
) -> tuple[LRSchedulerSpec | None, list[Problem]]:
    problems: list[Problem] = []
    if not isinstance(raw, Mapping):
        return None, [problem("must be a mapping with an `lr_scheduler_init` block", phase, key, raw)]
    # implicit mode refuses init_pg_lrs (below): an unknown key's hint must not offer it
    known = [k for k in LR_SCHEDULER_KEYS if not (implicit and k == "init_pg_lrs")]
    for k in raw:
        if k not in LR_SCHEDULER_KEYS:
            problems.append(problem(f"unknown key (expected one of {', '.join(known)})", phase, f"{key}.{k}"))
    if "lr_scheduler_init" not in raw:
        problems.append(problem("an `lr_scheduler_init` block with a `class_path` is required", phase, key))
        return None, problems
    init = _parse_init(raw["lr_scheduler_init"], phase, f"{key}.lr_scheduler_init", problems)
    pl_cfg_raw = raw.get("pl_lrs_cfg", {}) or {}
    pl_cfg: dict[str, Any] = {}
    if not isinstance(pl_cfg_raw, Mapping):
        problems.append(problem("must be a mapping of LRSchedulerConfig fields", phase, f"{key}.pl_lrs_cfg", pl_cfg_raw))
    else:
        for k, v in pl_cfg_raw.items():
            sub = f"{key}.pl_lrs_cfg.{k}"
            if k not in PL_LRS_KEYS:
                problems.append(problem(f"unknown key (expected one of {', '.join(PL_LRS_KEYS)})", phase, sub))
            elif k == "interval" and v not in ("step", "epoch"):
                problems.append(problem('must be "step" or "epoch"', phase, sub, v))
            elif k == "frequency" and (_as_int(v) is None or _as_int(v) < 1):  # type: ignore[operator]
                problems.append(problem("must be a positive integer", phase, sub, v))
            elif k in ("name", "monitor") and v is not None and not isinstance(v, str):
                problems.append(problem("must be a string", phase, sub, v))
            elif k in ("strict", "reduce_on_plateau") and not isinstance(v, bool):
                problems.append(problem("must be true or false", phase, sub, v))
            else:
                pl_cfg[k] = _as_int(v) if k == "frequency" else v
    init_pg_lrs: list[float] | None = None
    if "init_pg_lrs" in raw:
        raw_lrs = raw["init_pg_lrs"]
        if implicit:
            problems.append(
                problem(
                    "not allowed in `reinit_lr_cfg` (implicit mode applies one config at every phase)",
                    phase,
                    f"{key}.init_pg_lrs",
                )
            )
        elif not isinstance(raw_lrs, (list, tuple)) or not raw_lrs:
            problems.append(problem("must be a non-empty list of learning rates", phase, f"{key}.init_pg_lrs", raw_lrs))
        else:
            parsed = [as_lr(v) for v in raw_lrs]
            bad = [i for i, v in enumerate(parsed) if v is None]
            if bad:
                problems.append(
                    problem(
                        f"entry {bad[0]} ({_short_repr(raw_lrs[bad[0]])}) is not a finite, non-negative float",
                        phase,
                        f"{key}.init_pg_lrs",
                        list(raw_lrs),
                    )
                )
            else:
                init_pg_lrs = [float(v) for v in parsed]  # type: ignore[arg-type]
    use_current = raw.get("use_current_optimizer_pg_lrs", False)
    if not isinstance(use_current, bool):
        problems.append(problem("must be true or false", phase, f"{key}.use_current_optimizer_pg_lrs", use_current))
        use_current = False
    if init is None:
        return None, problems
    spec = LRSchedulerSpec(
        lr_scheduler_init=init, pl_lrs_cfg=pl_cfg, init_pg_lrs=init_pg_lrs, use_current_optimizer_pg_lrs=use_current
    )
    return spec, problems


def parse_optimizer_spec(raw: Any, phase: int | None, key: str = "new_optimizer") -> tuple[OptimizerSpec | None, list[Problem]]:
    problems: list[Problem] = []
    if not isinstance(raw, Mapping):
        return None, [problem("must be a mapping with an `optimizer_init` block", phase, key, raw)]
    for k in raw:
        if k not in OPTIMIZER_KEYS:
            problems.append(problem(f"unknown key (expected {OPTIMIZER_KEYS[0]})", phase, f"{key}.{k}"))
    if "optimizer_init" not in raw:
        problems.append(problem("an `optimizer_init` block with a `class_path` is required", phase, key))
        return None, problems
    init = _parse_init(raw["optimizer_init"], phase, f"{key}.optimizer_init", problems)
    return (OptimizerSpec(init) if init else None), problems


def parse_phase(index: int, raw: Any, base_max_lr: float | None, problems: list[Problem], warnings: list[str]) -> Phase:
    phase = Phase(index=index)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(problem("a phase must be a mapping (params, lr, max_transition_epoch, ...)", index, None))
        return phase
    for k in raw:
        if k not in PHASE_KEYS:
            problems.append(problem(f"unknown key (expected one of {', '.join(PHASE_KEYS)})", index, str(k)))
    params = raw.get("params", [])
    if params is None:
        params = []
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, list) or not all(isinstance(p, str) and p for p in params):
        problems.append(problem("must be a list of parameter names or regexes", index, "params", params))
    else:
        phase.params = list(params)
    mte = raw.get("max_transition_epoch", -1)
    mte_int = _as_int(mte)
    if mte_int is None or mte_int < -1:
        problems.append(problem("must be an integer >= -1 (-1: early stopping only)", index, "max_transition_epoch", mte))
    else:
        phase.max_transition_epoch = mte_int
    if index == 0:
        if raw.get("lr") is not None:
            warnings.append(
                f"phase 0: lr = {raw['lr']!r} is ignored; phase 0 uses the lr of the optimizer from configure_optimizers"
            )
        for key in ("new_lr_scheduler", "new_optimizer"):
            if raw.get(key) is not None:
                problems.append(
                    problem(
                        "reinitialization is not allowed in phase 0; configure the initial one in the LightningModule",
                        0,
                        key,
                    )
                )
    else:
        lr_raw = raw.get("lr", base_max_lr)
        if lr_raw is None and base_max_lr is None and raw.get("lr") is None:
            phase.lr = None  # base_max_lr=None: new groups start at the optimizer's own lr (FTS documents this)
        else:
            lr = as_lr(lr_raw)
            if lr is None:
                problems.append(problem("must be a finite, non-negative float", index, "lr", lr_raw))
            phase.lr = lr
        if raw.get("new_lr_scheduler") is not None:
            spec, sub = parse_lr_scheduler_spec(raw["new_lr_scheduler"], index)
            problems.extend(sub)
            phase.new_lr_scheduler = spec
        if raw.get("new_optimizer") is not None:
            ospec, sub = parse_optimizer_spec(raw["new_optimizer"], index)
            problems.extend(sub)
            phase.new_optimizer = ospec
    return phase


def parse_schedule(raw: Any, base_max_lr: float | None = 1e-5) -> tuple[Schedule, list[str]]:
    """Check the structure and types of a raw schedule mapping; return it parsed, plus warnings.

    Raises :class:`ScheduleError` listing every problem found (not just the first).
    """
    problems: list[Problem] = []
    warnings: list[str] = []
    if base_max_lr is not None and as_lr(base_max_lr) is None:
        raise ScheduleError([problem("must be a finite, non-negative float", None, "base_max_lr", base_max_lr)])
    if not isinstance(raw, Mapping) or not raw:
        raise ScheduleError([problem("a schedule must be a non-empty mapping of phase numbers to phases", None, None)])
    keyed: dict[int, Any] = {}
    for k, v in raw.items():
        ik = _as_int(k)
        if ik is None and isinstance(k, str):
            try:
                ik = int(k.strip())
            except ValueError:
                ik = None
        if ik is None:
            problems.append(problem("phase keys must be integers", None, f"phase key {k!r}"))
            continue
        if ik in keyed:
            problems.append(problem("duplicate phase", ik, None))
            continue
        keyed[ik] = v
    if problems:
        raise ScheduleError(problems)
    order = sorted(keyed)
    if order != list(range(len(order))):
        raise ScheduleError(
            [problem(f"phase keys must be 0, 1, 2, ... without gaps; got {order}", None, None)]
        )
    phases = [parse_phase(i, keyed[i], base_max_lr, problems, warnings) for i in order]
    if problems:
        raise ScheduleError(problems)
    return Schedule(phases), warnings


# --------------------------------------------------------------------------------------------------------------
# Resolving parameter patterns
# --------------------------------------------------------------------------------------------------------------


def resolve_params(
    schedule: Schedule,
    param_names: Sequence[str],
    shared_aliases: Mapping[str, str] | None = None,
    settled_through: int = -1,
    strict: Collection[int] = (),
) -> list[str]:
    """Fill each phase's ``resolved`` list; raise on unmatched patterns or phases that overlap.

    An entry that is an exact parameter name matches that name; otherwise it is a regex matched with ``re.match``
    (anchored at the start, as FTS does). Shared-parameter aliases (names that ``named_parameters()`` hides because
    they point to an already-registered tensor) are pruned with a warning. Returns warnings.

    ``settled_through``: phases up to this index have started (or are starting) with their params: a later phase
    that names one of theirs leaves it out, with a warning, instead of clashing. This is the state a queued edit that
    moves a parameter into an earlier phase leaves between the two transitions (the later phase's own edit, which
    removes it there, applies at its own transition), and what a resume from that moment finds in the checkpoint.
    Phases in ``strict`` (those an edit being checked changes) clash as usual: an edit may not name them itself.
    """
    problems: list[Problem] = []
    warnings: list[str] = []
    shared_aliases = shared_aliases or {}
    known = set(param_names)
    owner: dict[str, int] = {}
    overlaps: dict[str, list[int]] = {}
    via: dict[tuple[int, str], str] = {}  # (phase, parameter) -> the params entry that named it
    for phase in schedule.phases:
        resolved: list[str] = []
        for pattern in phase.params:
            if pattern in known:
                matches = [pattern]
            else:
                try:
                    rx = re.compile(pattern)
                except re.error as err:
                    problems.append(problem(f"invalid regex: {err}", phase.index, "params", pattern))
                    continue
                matches = [n for n in param_names if rx.match(n)]
            if not matches:
                if pattern in shared_aliases:
                    warnings.append(
                        f"phase {phase.index}: params entry {pattern!r} is a shared parameter; it is thawed with its "
                        f"source {shared_aliases[pattern]!r}"
                    )
                    continue
                problems.append(problem("matches no parameter of the model", phase.index, "params", pattern))
                continue
            for name in matches:
                if name in resolved:
                    continue
                resolved.append(name)
                via[(phase.index, name)] = pattern
        if phase.index > settled_through >= 0 and phase.index not in strict:
            taken = [n for n in resolved if owner.get(n, phase.index) <= settled_through]
            if taken:
                resolved = [n for n in resolved if n not in taken]
                warnings.append(
                    f"phase {phase.index}: params: {', '.join(taken)} already thawed by phase "
                    f"{', '.join(str(i) for i in sorted({owner[n] for n in taken}))}; phase {phase.index} leaves "
                    f"{'it' if len(taken) == 1 else 'them'} out"
                )
        for name in resolved:
            if name in owner and owner[name] != phase.index:
                overlaps.setdefault(name, [owner[name]]).append(phase.index)
            else:
                owner[name] = phase.index
        # keep the model's registration order: it fixes the order of parameters inside a group
        order = {n: i for i, n in enumerate(param_names)}
        phase.resolved = sorted(resolved, key=lambda n: order[n])
    # one line per clash of entries (a regex may take dozens of parameters that an earlier phase holds)
    clashes: dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]] = {}
    for name, phases in overlaps.items():
        clashes.setdefault((tuple(phases), tuple(via[(p, name)] for p in phases)), []).append(name)
    for (phases, entries), names in clashes.items():
        by = " and ".join(f"{e!r} in phase {p}" for p, e in zip(phases, entries))
        what = "parameter is" if len(names) == 1 else f"{len(names)} parameters are"
        problems.append(
            problem(f"{what} scheduled in more than one phase ({', '.join(map(str, phases))}), by {by}; phases must "
                    "be disjoint", phases[-1], "params",
                    names[0] if len(names) == 1 else names if len(names) <= 4 else [*names[:3], f"… {len(names) - 3} more"])
        )
    if problems:
        raise ScheduleError(problems)
    return warnings


# --------------------------------------------------------------------------------------------------------------
# Generating, dumping, and simulating group layouts
# --------------------------------------------------------------------------------------------------------------


def generate_implicit(param_names: Sequence[str]) -> dict[int, dict[str, Any]]:
    """FTS's implicit rule: parameters in reverse registration order, two per phase (an odd one out goes last)."""
    reversed_names = list(param_names)[::-1]
    out: dict[int, dict[str, Any]] = {}
    for i in range(0, len(reversed_names), 2):
        out[i // 2] = {"params": reversed_names[i : i + 2]}
    return out


def dump_schedule(schedule: Schedule | Mapping[int, Any], resolved: bool = True) -> str:
    data = schedule.to_dict(resolved=resolved) if isinstance(schedule, Schedule) else dict(schedule)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def split_no_decay(names: Iterable[str], no_decay: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Split parameter names into (decay, no_decay) by substring, as the module's ``no_decay`` attribute asks."""
    names = list(names)
    if not no_decay:
        return names, []
    nd = [n for n in names if any(s in n for s in no_decay)]
    return [n for n in names if n not in nd], nd


@dataclass(frozen=True)
class GroupInfo:
    """One simulated optimizer parameter group."""

    phase: int
    no_decay: bool
    params: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"phase{self.phase}" + ("_no_decay" if self.no_decay else "")


def simulate_phase_groups(
    schedule: Schedule,
    no_decay: Sequence[str] | None,
    phase0_groups: int | None = None,
    reinit_optim_at: Iterable[int] = (),
) -> list[list[GroupInfo]]:
    """For each phase k, the optimizer's groups right after phase k's groups are added (before its reinit runs).

    ``phase0_groups`` overrides the phase-0 group count when the user's optimizer keeps its own layout.
    Optimizer reinitialization rebuilds phase 0 as 1 group (2 with ``no_decay``) and re-adds the rest in order.
    """
    reinit_at = set(reinit_optim_at)
    out: list[list[GroupInfo]] = []
    groups: list[GroupInfo] = []
    seen: set[str] = set()
    for phase in schedule.phases:
        if phase.index == 0:
            dec, nd = split_no_decay(phase.resolved, no_decay)
            if phase0_groups is not None and phase0_groups != (2 if no_decay else 1):
                # the user's optimizer kept its own phase-0 layout; later phases still split by no_decay
                groups = [GroupInfo(0, False, tuple(phase.resolved))] + [
                    GroupInfo(0, False, ()) for _ in range(max(phase0_groups - 1, 0))
                ]
            elif no_decay:
                groups = [GroupInfo(0, False, tuple(dec)), GroupInfo(0, True, tuple(nd))]
            else:
                groups = [GroupInfo(0, False, tuple(phase.resolved))]
            seen.update(phase.resolved)
        else:
            if phase.index in reinit_at:
                # a new optimizer is built from phase 0's params; earlier phases are re-added after it
                first = out[0][:2] if no_decay else out[0][:1]
                groups = list(first) + [g for g in groups if g.phase > 0]
            new = [n for n in phase.resolved if n not in seen]
            seen.update(new)
            if new:
                dec, nd = split_no_decay(new, no_decay)
                if no_decay:
                    groups = groups + [GroupInfo(phase.index, False, tuple(dec)), GroupInfo(phase.index, True, tuple(nd))]
                else:
                    groups = groups + [GroupInfo(phase.index, False, tuple(new))]
        out.append(list(groups))
    return out
