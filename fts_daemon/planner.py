"""Plan a run's learning rates without training.

The planner replays the schedule with the same :class:`~fts_daemon.engine.PhaseEngine` the callback uses, on
stand-in parameters (one zero each) and a copy of the initial optimizer and schedulers, stepping the schedulers on
Lightning's rules: step-interval configs after every ``frequency``-th batch of an epoch, epoch-interval configs after
the last batch when ``(epoch + 1) % frequency == 0``. Phase starts come from ``max_transition_epoch`` or from
given transition epochs (early-stopping transitions cannot be known ahead). ReduceLROnPlateau depends on metrics,
so plans hold its LR unless per-epoch metric values are supplied.

With the same transition epochs, the plan equals the trained trajectory exactly (tests check it).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pytorch_lightning.utilities.types import LRSchedulerConfig
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fts_daemon.engine import EngineSettings, PhaseEngine, SimpleHost
from fts_daemon.events import lr_tag_names
from fts_daemon.reinit import capture_lr_state
from fts_daemon.schedule import Schedule


class _ParamView:
    """Just enough of an nn.Module for the engine: named stand-in parameters, no submodules."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self._named = named

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._named)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named]

    def modules(self) -> list[Any]:
        return []

    def named_modules(self) -> list[tuple[str, Any]]:
        return []


@dataclass
class InitialSetup:
    """The optimizer and schedulers as phase 0 starts, rebuilt on stand-in parameters (cheap to copy)."""

    view: _ParamView
    optimizer: torch.optim.Optimizer
    lr_configs: list[LRSchedulerConfig]

    def clone(self) -> InitialSetup:
        return copy.deepcopy(self)


def snapshot_initial(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_configs: Sequence[LRSchedulerConfig]
) -> InitialSetup:
    """Copy ``optimizer`` and ``lr_configs`` onto stand-in parameters that mirror ``module``'s names and flags."""
    standins: dict[int, torch.nn.Parameter] = {}
    named = []
    for name, p in module.named_parameters():
        s = torch.nn.Parameter(torch.zeros(1), requires_grad=p.requires_grad)
        standins[id(p)] = s
        named.append((name, s))
    groups = []
    for g in optimizer.param_groups:
        entry = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
        entry["params"] = [standins[id(p)] for p in g["params"] if id(p) in standins]
        groups.append(entry)
    # constructors do not accept every key they store in ``defaults`` (AdamW's decoupled_weight_decay, ...)
    accepted = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {k: copy.deepcopy(v) for k, v in optimizer.defaults.items() if k in accepted}
    new_opt = type(optimizer)(groups, **kwargs)
    new_opt.defaults = copy.deepcopy(optimizer.defaults)
    # deepcopy the scheduler configs with the optimizer mapped to the stand-in (state, lambdas and all)
    memo: dict[int, Any] = {id(optimizer): new_opt}
    for p, s in ((p, standins[id(p)]) for g in optimizer.param_groups for p in g["params"] if id(p) in standins):
        memo[id(p)] = s
    configs = [copy.deepcopy(cfg, memo) for cfg in lr_configs]
    return InitialSetup(view=_ParamView(named), optimizer=new_opt, lr_configs=configs)


@dataclass
class Plan:
    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    phases: list[int] = field(default_factory=list)
    series: dict[str, list[float | None]] = field(default_factory=dict)
    phase_starts: list[dict[str, int]] = field(default_factory=list)
    # steps per recorded point (1: every step); each phase's first and last step and the plan's last are recorded
    # whatever the spacing
    stride: int = 1
    total_steps: int = 0  # steps simulated
    horizon_epochs: int | None = None  # the epochs simulated when a horizon cut the run short (None: all of them)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "phases": self.phases,
            "series": self.series,
            "phase_starts": self.phase_starts,
            "stride": self.stride,
            "total_steps": self.total_steps,
            "horizon_epochs": self.horizon_epochs,
        }

    def sampled(self, max_steps: int) -> tuple[Plan, int]:
        """At most about ``max_steps`` of the recorded steps, evenly spaced, with each phase's first step and the
        last step kept (where LRs jump); and the spacing in steps (``stride``: 1 is every step). For replies: a long
        run's full plan holds every one of its steps, far more than a chart can show or a client should parse."""
        n = len(self.steps)
        if n <= max_steps:
            return self, self.stride
        stride = -(-n // max(max_steps, 2))
        starts = {bisect_left(self.steps, p["step"]) for p in self.phase_starts if p["step"] <= self.steps[-1]}
        keep = sorted({*range(0, n, stride), n - 1, *starts})
        return Plan(
            steps=[self.steps[i] for i in keep],
            epochs=[self.epochs[i] for i in keep],
            phases=[self.phases[i] for i in keep],
            series={tag: [values[i] for i in keep] for tag, values in self.series.items()},
            phase_starts=[dict(p) for p in self.phase_starts],
            stride=stride * self.stride,
            total_steps=self.total_steps,
            horizon_epochs=self.horizon_epochs,
        ), stride * self.stride

    def index_of(self, step: int) -> int:
        """The index of ``step`` among the recorded steps (the nearest one after it, if it was not recorded)."""
        return bisect_left(self.steps, step)

    def group_lrs(self, step_index: int) -> dict[str, float]:
        return {k: v[step_index] for k, v in self.series.items() if v[step_index] is not None}

    def table(self) -> list[dict[str, Any]]:
        """Per phase: its start, and each group's LR at the phase's first and last step."""
        rows = []
        if not self.steps:
            return rows
        for i, start in enumerate(self.phase_starts):
            end = self.phase_starts[i + 1]["step"] - 1 if i + 1 < len(self.phase_starts) else self.steps[-1]
            if end < start["step"]:
                continue
            first = self.group_lrs(self.index_of(start["step"]))
            last = self.group_lrs(self.index_of(end))
            rows.append({**start, "last_step": end, "first": first, "last": last})
        return rows


def _tags(optimizer: torch.optim.Optimizer, lr_configs: Sequence[LRSchedulerConfig]) -> list[str]:
    name = lr_configs[0].name if lr_configs else None
    return lr_tag_names(name, type(optimizer).__name__, [g.get("name") for g in optimizer.param_groups])


class PlanError(ValueError):
    """A plan that cannot be asked for (e.g. start epochs for phases the schedule lacks)."""


def check_transition_epochs(transition_epochs: Mapping[int, int], schedule: Schedule, max_depth: int | None = None,
                            max_epochs: int | None = None) -> None:
    """Raise PlanError unless every phase named exists after phase 0 and runs (``max_depth``), starts within the run
    (``max_epochs``) and no later than the phase before it must end (its ``max_transition_epoch``), that phase itself
    starts (given, or reached through limits), and the start epochs rise with the phase: a start the simulation could
    not use is refused rather than silently left out."""
    n_phases = len(schedule)
    given = sorted(transition_epochs.items())
    for phase, epoch in given:
        if not 1 <= phase < n_phases:
            raise PlanError(f"phase {phase} cannot be given a start epoch: the schedule has phases 0..{n_phases - 1}, "
                            "and phase 0 starts at epoch 0")
        if max_depth is not None and phase > max_depth:
            raise PlanError(f"phase {phase} does not run: max_depth is {max_depth}")
        if epoch < 1:
            raise PlanError(f"phase {phase} cannot start at epoch {epoch}: the earliest is epoch 1")
        before = phase - 1
        while before > 0 and before not in transition_epochs and schedule[before - 1].max_transition_epoch >= 0:
            before -= 1  # phase `before` starts at its predecessor's limit: look further back
        if before > 0 and before not in transition_epochs:
            raise PlanError(f"phase {phase} cannot start before phase {before} does, and nothing says when that is "
                            f"(phase {before - 1} has no max_transition_epoch; give phase {before} a start too)")
        limit = schedule[phase - 1].max_transition_epoch
        if limit >= 0:  # else ended by early stopping only: any start is possible
            # the phase before ends at its limit, or one epoch after it began if it began later (a limit behind an
            # earlier phase's, or a start given for it)
            began = max([transition_epochs.get(phase - 1, 0)] + [
                schedule[q].max_transition_epoch for q in range(phase - 1) if schedule[q].max_transition_epoch >= 0])
            latest = max(limit, began + 1 if phase > 1 else limit)
            if epoch > latest:
                raise PlanError(f"phase {phase} cannot start at epoch {epoch}: phase {phase - 1}'s "
                                f"max_transition_epoch {limit} ends it by epoch {latest}")
        if max_epochs is not None and epoch >= max_epochs:
            raise PlanError(f"phase {phase} cannot start at epoch {epoch}: the run ends after epoch {max_epochs - 1} "
                            f"(max_epochs {max_epochs})")
    for (p0, e0), (p1, e1) in zip(given, given[1:]):
        if e1 <= e0:
            raise PlanError(f"phase {p1} would start at epoch {e1}, not after phase {p0} (epoch {e0})")


def plan_run(
    initial: InitialSetup,
    schedule: Schedule,
    settings: EngineSettings,
    max_depth: int,
    steps_per_epoch: int,
    max_epochs: int,
    transition_epochs: Mapping[int, int] | None = None,
    plateau_metrics: Sequence[float] | None = None,
    *,
    max_points: int | None = None,
    max_steps: int | None = None,
    pause: Callable[[], Any] | None = None,
) -> Plan:
    """Simulate the per-step, per-group LRs of a whole run.

    ``transition_epochs`` maps a phase to the epoch it starts (overrides ``max_transition_epoch``; use it for phases
    that early stopping ended, or to preview). ``plateau_metrics[e]`` feeds ReduceLROnPlateau after epoch ``e``.

    The simulation costs a few microseconds per step and, unbounded, a list entry per step and group: a run of
    2000 epochs of 62,500 steps would take many minutes and gigabytes. ``max_steps`` ends the simulation after the
    first epoch that reaches it (``horizon_epochs`` says where); ``max_points`` records about that many steps,
    evenly spaced (``stride``), plus each phase's first and last step and the last one; ``pause`` is called every
    few hundred simulated steps (a daemon yields the GIL to training there).
    """
    setup = initial.clone()
    host = SimpleHost(setup.optimizer, setup.lr_configs)
    engine = PhaseEngine(copy.deepcopy(schedule), settings)
    transition_epochs = dict(transition_epochs or {})
    check_transition_epochs(transition_epochs, schedule, max_depth, max_epochs)
    plan = Plan(phase_starts=[{"phase": 0, "epoch": 0, "step": 0}])
    epochs = max_epochs
    if max_steps is not None and steps_per_epoch > 0 and max_epochs * steps_per_epoch > max_steps:
        epochs = plan.horizon_epochs = max(1, -(-max_steps // steps_per_epoch))
    total = max(epochs, 0) * steps_per_epoch
    stride = 1 if max_points is None or total <= max_points else -(-total // max(max_points, 2))
    plan.stride, plan.total_steps = stride, total

    def due(depth: int, epoch: int) -> bool:
        """Whether phase ``depth + 1`` starts at ``epoch``."""
        if depth >= max_depth:
            return False
        start = transition_epochs.get(depth + 1)
        if start is None:
            limit = engine.schedule[depth].max_transition_epoch
            return 0 <= limit <= epoch
        return epoch >= start

    depth = 0
    step = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the stand-in optimizer never stepped; it need not
        for epoch in range(epochs):
            started = False
            if due(depth, epoch):
                pre = capture_lr_state(host.optimizer, host.lr_configs)
                depth += 1
                engine.advance(host, setup.view, depth, pre, None)  # type: ignore[arg-type]
                plan.phase_starts.append({"phase": depth, "epoch": epoch, "step": step})
                started = True
            # the steps of this epoch to record: every stride-th, a phase's first, a phase's last, the plan's last
            end = step + steps_per_epoch
            record = list(range(-(-step // stride) * stride, end, stride))
            if steps_per_epoch and started and (not record or record[0] != step):
                record.insert(0, step)
            if steps_per_epoch and (epoch == epochs - 1 or due(depth, epoch + 1)) and (not record or record[-1] != end - 1):
                record.append(end - 1)
            # groups, tags and schedulers change only at a transition (an epoch's start): look them up once an epoch
            groups = host.optimizer.param_groups
            columns = []
            for tag in _tags(host.optimizer, host.lr_configs):
                series = plan.series.get(tag)
                if series is None:  # a group new in this phase: no LR before it existed
                    series = plan.series[tag] = [None] * len(plan.steps)
                columns.append(series)
            stepped = [cfg for cfg in host.lr_configs if cfg.interval == "step" and not cfg.reduce_on_plateau]
            if not stepped:  # nothing changes an LR within the epoch: its steps share the epoch's LRs
                for series, group in zip(columns, groups):
                    series.extend([float(group["lr"])] * len(record))
            else:
                wanted = iter(record)
                nxt = next(wanted, -1)
                for batch in range(steps_per_epoch):
                    if step + batch == nxt:
                        for series, group in zip(columns, groups):
                            series.append(float(group["lr"]))
                        nxt = next(wanted, -1)
                    for cfg in stepped:
                        if (batch + 1) % cfg.frequency == 0:
                            cfg.scheduler.step()
                    if pause is not None and batch & 511 == 511:
                        pause()
            step = end
            plan.steps.extend(record)
            plan.epochs.extend([epoch] * len(record))
            plan.phases.extend([depth] * len(record))
            for series in plan.series.values():  # groups a new optimizer no longer has
                if len(series) < len(plan.steps):
                    series.extend([None] * (len(plan.steps) - len(series)))
            for cfg in host.lr_configs:
                if cfg.interval == "epoch" and not cfg.reduce_on_plateau and (epoch + 1) % cfg.frequency == 0:
                    cfg.scheduler.step()
            if plateau_metrics is not None and epoch < len(plateau_metrics):
                for cfg in host.lr_configs:
                    if isinstance(cfg.scheduler, ReduceLROnPlateau) and (epoch + 1) % cfg.frequency == 0:
                        cfg.scheduler.step(plateau_metrics[epoch])
            if pause is not None:
                pause()
    return plan
