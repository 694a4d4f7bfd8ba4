"""The phase machine: thaw, add groups, reinitialize, independent of the Trainer.

:class:`PhaseEngine` works on a :class:`Host` (an optimizer plus a list of Lightning ``LRSchedulerConfig``), so the
same code drives the real callback and the planner (which runs it on stand-in parameters without training).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pytorch_lightning.utilities.types import LRSchedulerConfig
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fts_daemon import compat
from fts_daemon.reinit import (
    LRState,
    NamingPolicy,
    add_phase_groups,
    build_groups,
    build_optimizer,
    reinit_scheduler,
    restore_lr_state,
)
from fts_daemon.schedule import LRSchedulerSpec, OptimizerSpec, Schedule


class Host(Protocol):
    """Where the optimizer and scheduler configs live (the Trainer's strategy, or the planner's stand-in)."""

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...

    @property
    def lr_configs(self) -> list[LRSchedulerConfig]: ...

    def set_lr_configs(self, configs: list[LRSchedulerConfig]) -> None: ...


@dataclass
class SimpleHost:
    """A Host that just holds the objects (planner, tests)."""

    _optimizer: torch.optim.Optimizer
    _lr_configs: list[LRSchedulerConfig] = field(default_factory=list)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    @property
    def lr_configs(self) -> list[LRSchedulerConfig]:
        return self._lr_configs

    def set_lr_configs(self, configs: list[LRSchedulerConfig]) -> None:
        self._lr_configs = configs


@dataclass
class EngineSettings:
    no_decay: Sequence[str] | None = None
    apply_lambdas_new_pgs: bool = False
    allow_untested: bool = False
    allowed_prefixes: Sequence[str] | None = None
    naming: NamingPolicy = field(default_factory=NamingPolicy)
    reinit_lr_cfg: LRSchedulerSpec | None = None  # implicit mode: applied at every transition
    reinit_optim_cfg: OptimizerSpec | None = None
    frozen_bn_track_running_stats: bool = True


@dataclass
class Applied:
    """What a transition did, for events and logs."""

    depth: int
    new_groups: list[int] = field(default_factory=list)  # indices of groups added for this phase
    scheduler: dict[str, Any] | None = None  # the spec now in force, None = still the module's own
    optimizer: dict[str, Any] | None = None
    # whether this transition built a new scheduler / optimizer (the specs above may be an earlier phase's, and
    # implicit mode builds the same spec afresh at every transition)
    scheduler_reinit: bool = False
    optimizer_reinit: bool = False


class PhaseEngine:
    def __init__(self, schedule: Schedule, settings: EngineSettings):
        self.schedule = schedule
        self.settings = settings
        # Specs of what a reinit put in place; checkpointed so a resume rebuilds the same objects.
        self.active_lr_spec: LRSchedulerSpec | None = None
        self.active_optim_spec: OptimizerSpec | None = None

    # ---------------------------------------------------------------------------------------------- freezing

    def freeze_all(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad = False
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                # Lightning's freeze turns off running-stat tracking for frozen BN; FTS's default turns it back on
                m.track_running_stats = self.settings.frozen_bn_track_running_stats

    def thaw_phase(self, module: torch.nn.Module, depth: int) -> list[str]:
        names = set(self.schedule[depth].resolved)
        thawed = []
        for n, p in module.named_parameters():
            if n in names and not p.requires_grad:
                p.requires_grad = True
                thawed.append(n)
        if not self.settings.frozen_bn_track_running_stats:
            for mod_name, m in module.named_modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(
                    n.startswith(mod_name + ".") for n in names
                ):
                    m.track_running_stats = True
        return thawed

    def thaw_to_depth(self, module: torch.nn.Module, depth: int) -> None:
        for i in range(depth + 1):
            self.thaw_phase(module, i)

    # ---------------------------------------------------------------------------------------------- phases

    def phase_lr(self, index: int, optimizer: torch.optim.Optimizer) -> float:
        lr = self.schedule[index].lr
        return float(optimizer.defaults["lr"]) if lr is None else float(lr)

    def lr_spec_for(self, index: int) -> LRSchedulerSpec | None:
        return self.settings.reinit_lr_cfg or self.schedule[index].new_lr_scheduler

    def optim_spec_for(self, depth: int) -> OptimizerSpec | None:
        if depth == 0:
            return None
        return self.settings.reinit_optim_cfg or self.schedule[depth].new_optimizer

    def configure_phase(
        self,
        host: Host,
        module: torch.nn.Module,
        index: int,
        depth: int,
        pre_state: LRState | None,
        applied: Applied | None = None,
    ) -> None:
        """Add phase ``index``'s groups and, when ``depth > 0``, run its scheduler reinit (FTS's per-phase step)."""
        lr_spec = self.lr_spec_for(index) if depth > 0 else None
        if index == depth and depth > 0 and pre_state is not None:
            # the latest LRs survive restore-best and optimizer replays: put them back before adding groups
            restore_lr_state(host.optimizer, host.lr_configs, pre_state)
        optimizer = host.optimizer
        before = len(optimizer.param_groups)
        add_phase_groups(
            optimizer,
            host.lr_configs,
            list(module.named_parameters()),
            self.schedule[index].resolved,
            index,
            self.phase_lr(index, optimizer),
            self.settings.no_decay,
            self.settings.apply_lambdas_new_pgs,
            self.settings.naming,
        )
        if applied is not None and index == depth:
            applied.new_groups = list(range(before, len(optimizer.param_groups)))
        if lr_spec is not None:
            cfg = reinit_scheduler(optimizer, lr_spec, self.settings.allow_untested, self.settings.allowed_prefixes)
            host.set_lr_configs([cfg])
            self.active_lr_spec = copy.deepcopy(lr_spec)

    def advance(
        self,
        host: Host,
        module: torch.nn.Module,
        depth: int,
        pre_state: LRState | None,
        restored_depth: int | None = None,
    ) -> Applied:
        """Configure the optimizer for ``depth``.

        ``restored_depth`` is set when a best checkpoint (of that depth) was just restored: every phase after it is
        re-added in order. A new optimizer replays every phase from 0. Otherwise only ``depth`` is configured.
        """
        applied = Applied(depth=depth)
        optim_spec = self.optim_spec_for(depth)
        applied.optimizer_reinit = optim_spec is not None
        applied.scheduler_reinit = depth > 0 and self.lr_spec_for(depth) is not None
        if optim_spec is not None:
            replay = list(range(0, depth + 1))
        elif restored_depth is not None:
            replay = list(range(restored_depth + 1, depth + 1))
        else:
            replay = [depth]
        for i in replay:
            self.thaw_phase(module, i)
            if optim_spec is not None and i == 0:
                groups = build_groups(
                    list(module.named_parameters()),
                    self.schedule[0].resolved,
                    self.settings.no_decay,
                    0,
                    self.settings.naming,
                )
                new_opt = build_optimizer(optim_spec, groups, self.settings.allowed_prefixes)
                host.set_optimizer(new_opt)
                for cfg in host.lr_configs:
                    cfg.scheduler.optimizer = new_opt
                self.active_optim_spec = copy.deepcopy(optim_spec)
            else:
                self.configure_phase(host, module, i, depth, pre_state, applied)
        if self.active_lr_spec is not None:
            applied.scheduler = self.active_lr_spec.to_dict()
        if self.active_optim_spec is not None:
            applied.optimizer = self.active_optim_spec.to_dict()
        return applied

    def enforce_phase0(self, host: Host, module: torch.nn.Module) -> None:
        """Rebuild the optimizer's groups to hold exactly phase 0's params (FTS's ``enforce_phase0_params``).

        The user's per-group LRs are replaced by the optimizer's default lr, and every scheduler is re-initialized
        over the new groups, so phase 0 starts exactly as if configure_optimizers had passed phase 0's params.
        """
        optimizer = host.optimizer
        n_before = len(optimizer.param_groups)
        optimizer.param_groups = []
        for cfg in host.lr_configs:
            cfg.scheduler.last_epoch = -1
            if not isinstance(cfg.scheduler, ReduceLROnPlateau):
                cfg.scheduler.base_lrs = []
        self.freeze_all(module)
        self.thaw_phase(module, 0)
        self.configure_phase(host, module, 0, 0, None)
        for cfg in host.lr_configs:
            compat.scheduler_initial_step(cfg.scheduler)
            compat.set_scheduler_last_lr(cfg.scheduler, cfg.scheduler.optimizer)
            if isinstance(cfg.scheduler, ReduceLROnPlateau):
                cfg.scheduler.min_lrs = cfg.scheduler.min_lrs[n_before:]

    def phase0_mismatch(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> bool:
        """True when the optimizer holds frozen params or a different set than phase 0 thaws."""
        in_opt = [p for g in optimizer.param_groups for p in g["params"]]
        if any(not p.requires_grad for p in in_opt):
            return True
        names0 = set(self.schedule[0].resolved)
        expected = {id(p) for n, p in module.named_parameters() if n in names0}
        return {id(p) for p in in_opt if p.requires_grad} != expected
