"""``FinetuningScheduler``: the Lightning callback that runs a phased fine-tuning schedule.

A drop-in for finetuning-scheduler 2.14.1's callback (same constructor arguments, same schedule YAML, the same
learning rates step for step), plus: full validation before the first step, simulated group counts, exact
resume of a reinitialized scheduler, optional stable group names, a logged phase scalar, and hooks the daemon
uses to apply queued schedule edits at the transition.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fts_daemon import compat
from fts_daemon.engine import Applied, EngineSettings, PhaseEngine, SimpleHost
from fts_daemon.planner import InitialSetup, Plan, plan_run, snapshot_initial
from fts_daemon.reinit import (
    DEFAULT_ALLOWED_PREFIXES,
    NamingPolicy,
    ReinitError,
    capture_lr_state,
    is_supported_scheduler,
    pad_lambdas,
    rebuild_scheduler,
)
from fts_daemon.schedule import (
    LRSchedulerSpec,
    OptimizerSpec,
    Phase,
    Schedule,
    ScheduleError,
    dump_schedule,
    generate_implicit,
    load_schedule_file,
    parse_lr_scheduler_spec,
    parse_optimizer_spec,
    parse_phase,
    parse_schedule,
    resolve_params,
)
from fts_daemon.supporters import FTSCheckpoint, FTSEarlyStopping
from fts_daemon.validation import (
    ValidationOptions,
    ValidationReport,
    class_problems,
    max_transition_watermark,
    validate_schedule,
)

log = logging.getLogger("fts_daemon")

STATE_VERSION = 1

# Listener signature: (event kind, payload). The daemon turns these into bus events; nothing here waits on them.
Listener = Callable[[str, dict[str, Any]], None]


class FTSConfigError(MisconfigurationException):
    """Invalid schedule or callback configuration; ``problems`` has one line per issue."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def shared_param_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Names ``named_parameters()`` hides because they alias an already-registered tensor."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen and seen[id(p)] != name:
            aliases[name] = seen[id(p)]
        else:
            seen.setdefault(id(p), name)
    return aliases


_shared_param_aliases = shared_param_aliases  # old name, kept for callers written against it


class _TrainerHost:
    """The engine's view of the Trainer: one optimizer and its scheduler configs, via public strategy attributes."""

    def __init__(self, trainer: pl.Trainer):
        self.trainer = trainer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.strategy.optimizers[0]

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.trainer.strategy.optimizers = [optimizer]

    @property
    def lr_configs(self) -> list[Any]:
        return self.trainer.strategy.lr_scheduler_configs

    def set_lr_configs(self, configs: list[Any]) -> None:
        self.trainer.strategy.lr_scheduler_configs = configs


class FinetuningScheduler(Callback):
    """Phased fine-tuning with LR scheduler reinitialization.

    Arguments are finetuning-scheduler 2.14.1's (``strategy_adapter_cfg`` and ``custom_strategy_adapters`` are
    accepted for config compatibility; only the built-in single-device and DDP-family strategies are supported).
    Keyword-only extras:

    * ``strict_validation``: an ``init_pg_lrs`` whose length differs from the phase's group count is an error
      (default: a warning naming the groups it leaves at their phase ``lr``).
    * ``name_param_groups``: give groups stable names (``phase1``, ``phase1_no_decay``) so LearningRateMonitor
      tags read by phase instead of ``pgN``.
    * ``log_phase``: log the current phase as the scalar ``fts_phase`` to every logger when it changes.
    * ``allowed_class_prefixes``: class paths a schedule may name (default ``torch.optim.``; module-defined
      subclasses are allowed by adding their module prefix).
    """

    def __init__(
        self,
        ft_schedule: str | dict | None = None,  # a path (str or PathLike) or the schedule itself
        max_depth: int = -1,
        base_max_lr: float = 1e-5,
        restore_best: bool = True,
        gen_ft_sched_only: bool = False,
        epoch_transitions_only: bool = False,
        reinit_optim_cfg: dict | None = None,
        reinit_lr_cfg: dict | None = None,
        strategy_adapter_cfg: dict | None = None,
        custom_strategy_adapters: dict[str, str] | None = None,
        allow_untested: bool = False,
        apply_lambdas_new_pgs: bool = False,
        logging_level: int = logging.INFO,
        enforce_phase0_params: bool = True,
        frozen_bn_track_running_stats: bool = True,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        strict_validation: bool = False,
        name_param_groups: bool = False,
        log_phase: bool = True,
        allowed_class_prefixes: list[str] | None = None,
    ):
        super().__init__()
        compat.skip_unused_batch_hooks(self)  # Lightning need not call the per-step hooks it does not use
        self.ft_schedule = ft_schedule
        self.max_depth = max_depth
        self.base_max_lr = base_max_lr
        self.restore_best = restore_best
        self.gen_ft_sched_only = gen_ft_sched_only
        self.generated_schedule_file: Path | None = None  # written by gen_ft_sched_only, on rank 0
        self.epoch_transitions_only = epoch_transitions_only
        self.reinit_optim_cfg = reinit_optim_cfg
        self.reinit_lr_cfg = reinit_lr_cfg
        self.strategy_adapter_cfg = strategy_adapter_cfg or {}
        self.custom_strategy_adapters = custom_strategy_adapters
        self.allow_untested = allow_untested
        self.apply_lambdas_new_pgs = apply_lambdas_new_pgs
        self.enforce_phase0_params = enforce_phase0_params
        self.frozen_bn_track_running_stats = frozen_bn_track_running_stats
        self.strict_validation = strict_validation
        self.name_param_groups = name_param_groups
        self.log_phase = log_phase
        # None: torch.optim plus whatever module the schedule's classes live in must be allowed explicitly
        self.allowed_class_prefixes = list(allowed_class_prefixes) if allowed_class_prefixes else None
        self._log_dir = log_dir
        # our own logger only: FTS changes Lightning's global rank-zero logger, which surprises users
        log.setLevel(logging_level)

        self.schedule: Schedule | None = None
        self.engine: PhaseEngine | None = None
        self.report: ValidationReport | None = None
        self._configured_max_epochs: int | None = None  # the trainer's, before the final phase's limit raises it
        self._depth = 0
        self._restored: dict[str, Any] | None = None
        self._resume_plateau: dict[str, Any] | None = None
        self._phase0_groups_validated = False
        self.transitions: list[dict[str, Any]] = []  # history: one dict per phase start
        self.listeners: list[Listener] = []
        # called with the depth about to start, before it is configured: where the daemon applies queued edits
        self.before_transition: list[Callable[[FinetuningScheduler, int], None]] = []
        self.trainer: pl.Trainer | None = None
        self.pl_module: pl.LightningModule | None = None
        self.initial_setup: InitialSetup | None = None  # phase-0 optimizer/schedulers on stand-ins, for planning
        self._resolved_log_dir: str | None = None
        self._logged_phase: int | None = None

    # ------------------------------------------------------------------------------------------ properties

    @property
    def curr_depth(self) -> int:
        return self._depth

    @property
    def depth_remaining(self) -> int:
        return max(self.max_depth - self._depth, 0)

    @property
    def log_dir(self) -> str | None:
        if self._log_dir is not None:
            return os.fspath(self._log_dir)
        trainer = self.trainer
        if trainer is None:
            return None
        return trainer.log_dir or trainer.default_root_dir

    @property
    def state_key(self) -> str:
        return "FinetuningScheduler"

    def allowed_prefixes(self) -> list[str]:
        """Class-path prefixes a schedule (or an edit arriving over the wire) may name."""
        if self.allowed_class_prefixes is not None:
            return list(self.allowed_class_prefixes)
        return list(DEFAULT_ALLOWED_PREFIXES)

    _allowed_prefixes = allowed_prefixes  # old name, kept for callers written against it

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, payload)
            except Exception:  # a broken listener must never break training
                log.exception("fts listener failed on %s", kind)

    def _warn(self, message: str) -> None:
        rank_zero_warn(message)
        self._emit("warning", {"message": message})

    # ------------------------------------------------------------------------------------------ setup

    def _configure_callback_deps(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        added: list[Callback] = []
        n_fts = sum(isinstance(c, FinetuningScheduler) for c in callbacks)
        if n_fts > 1:
            raise MisconfigurationException("only one FinetuningScheduler callback may be used")
        es = [c for c in callbacks if isinstance(c, EarlyStopping)]
        if len([c for c in es if isinstance(c, FTSEarlyStopping)]) > 1:
            raise MisconfigurationException("only one FTSEarlyStopping callback may be used")
        if self.epoch_transitions_only:
            if es:
                self._warn("epoch_transitions_only is set: removing the EarlyStopping callback (phases end by epoch)")
                callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        elif not any(isinstance(c, FTSEarlyStopping) for c in es):
            if es:
                self._warn("replacing EarlyStopping with FTSEarlyStopping (same settings) so patience ends phases")
                kwargs = _init_kwargs(es[0], EarlyStopping)
                if "min_delta" in kwargs and kwargs.get("mode", "min") == "min":
                    # EarlyStopping stores min_delta negated in min mode; its constructor negates what it is given
                    kwargs["min_delta"] = -kwargs["min_delta"]
                callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
            else:
                self._warn("no FTSEarlyStopping given: adding FTSEarlyStopping(monitor='val_loss')")
                kwargs = {"monitor": "val_loss"}
            new_es = FTSEarlyStopping(**kwargs)
            callbacks.append(new_es)
            added.append(new_es)
        ckpts = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        if len([c for c in ckpts if isinstance(c, FTSCheckpoint)]) > 1:
            raise MisconfigurationException("only one FTSCheckpoint callback may be used")
        if not any(isinstance(c, FTSCheckpoint) for c in ckpts):
            if ckpts:
                kwargs = _init_kwargs(ckpts[0], ModelCheckpoint)
                if self.restore_best and not kwargs.get("monitor"):
                    kwargs["monitor"] = "val_loss"
                callbacks = [c for c in callbacks if c is not ckpts[0]]
                new_ck = FTSCheckpoint(**kwargs)
                callbacks.append(new_ck)
                added.append(new_ck)
            elif self.restore_best:
                self._warn("restore_best needs a checkpoint: adding FTSCheckpoint(monitor='val_loss')")
                new_ck = FTSCheckpoint(monitor="val_loss")
                callbacks.append(new_ck)
                added.append(new_ck)
        # LearningRateMonitor runs after us, so the first LR it logs in a phase is the reinitialized one
        lrm = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)] + lrm
        trainer.callbacks = compat.reorder_callbacks(trainer, callbacks)  # type: ignore[attr-defined]
        for cb in added:
            cb.setup(trainer, pl_module, stage)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and type(strategy).__name__ in (
            "SingleDeviceStrategy",
            "DDPStrategy",
        ):
            return
        if not self.allow_untested:
            raise MisconfigurationException(
                f"strategy {type(strategy).__name__} is not supported (single device and DDP are); "
                "pass allow_untested=True to try it"
            )
        self._warn(f"allow_untested: trying strategy {type(strategy).__name__}")

    def _raw_schedule(self, pl_module: pl.LightningModule, param_names: list[str]) -> tuple[Any, bool]:
        if self.ft_schedule is None:
            return generate_implicit(param_names), True
        if isinstance(self.ft_schedule, Mapping):
            return copy.deepcopy(dict(self.ft_schedule)), False
        return load_schedule_file(self.ft_schedule), False

    def _write_schedule(self, name: str, text: str) -> Path | None:
        log_dir = self._resolved_log_dir
        if self.trainer is None or not self.trainer.is_global_zero or not log_dir:
            return None
        path = Path(log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def build_schedule(self, pl_module: torch.nn.Module) -> tuple[Schedule, list[str], bool]:
        """Load (or generate), parse and resolve the schedule against the module; raise FTSConfigError."""
        problems: list[str] = []
        if self.ft_schedule is not None and self.reinit_lr_cfg:
            problems.append(
                "reinit_lr_cfg applies one scheduler at every phase of a generated schedule; with an explicit "
                "ft_schedule put new_lr_scheduler in the phases instead"
            )
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int) or self.max_depth < -1:
            # FTS takes any negative as given (and -5 then runs as if phase 0 were past the limit): refuse it
            problems.append(f"max_depth = {self.max_depth!r}: -1 (run every phase) or the index of the last phase to run")
        param_names = [n for n, _ in pl_module.named_parameters()]
        try:
            raw, implicit = self._raw_schedule(pl_module, param_names)
            schedule, warns = parse_schedule(raw, self.base_max_lr)
        except ScheduleError as err:
            raise FTSConfigError(problems + [str(p) for p in err.problems]) from None
        try:
            warns += resolve_params(schedule, param_names, shared_param_aliases(pl_module))
        except ScheduleError as err:
            raise FTSConfigError(problems + [str(p) for p in err.problems] + self._class_problems(schedule)) from None
        if problems:
            raise FTSConfigError(problems)
        return schedule, warns, implicit

    def _class_problems(self, schedule: Schedule) -> list[str]:
        """What the reinit configs' classes and arguments would be refused for (see ``class_problems``); nothing
        if the implicit configs themselves do not parse (those problems come with the next run)."""
        try:
            opts = self.validation_options()
        except FTSConfigError:
            return []
        return [str(p) for p in class_problems(schedule, opts)]

    def _implicit_specs(self) -> tuple[LRSchedulerSpec | None, OptimizerSpec | None]:
        problems = []
        lr_spec = optim_spec = None
        if self.reinit_lr_cfg:
            lr_spec, sub = parse_lr_scheduler_spec(self.reinit_lr_cfg, None, key="reinit_lr_cfg", implicit=True)
            problems += sub
        if self.reinit_optim_cfg:
            optim_spec, sub = parse_optimizer_spec(self.reinit_optim_cfg, None, key="reinit_optim_cfg")
            problems += sub
        if problems:
            raise FTSConfigError([str(p) for p in problems])
        return lr_spec, optim_spec

    def validation_options(self, phase0_groups: int | None = None, no_decay: Any = None) -> ValidationOptions:
        lr_spec, optim_spec = self._implicit_specs()
        return ValidationOptions(
            no_decay=no_decay,
            phase0_groups=phase0_groups,
            allow_untested=self.allow_untested,
            allowed_prefixes=self.allowed_prefixes(),
            strict=self.strict_validation,
            epoch_transitions_only=self.epoch_transitions_only,
            reinit_lr_cfg=lr_spec,
            reinit_optim_cfg=optim_spec,
        )

    def validate(self, schedule: Schedule, opts: ValidationOptions) -> ValidationReport:
        try:
            return validate_schedule(schedule, opts)
        except ScheduleError as err:
            raise FTSConfigError([str(p) for p in err.problems]) from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.trainer, self.pl_module = trainer, pl_module
        # trainer.log_dir broadcasts under DDP: every rank must ask, or rank 0 waits forever
        self._resolved_log_dir = self.log_dir
        self._configure_callback_deps(trainer, pl_module, stage)
        self._check_strategy(trainer)
        if self.strategy_adapter_cfg or self.custom_strategy_adapters:
            self._warn("strategy_adapter_cfg / custom_strategy_adapters are accepted for compatibility and ignored")
        schedule, warns, implicit = self.build_schedule(pl_module)
        path = None
        if implicit:
            path = self._write_schedule(
                f"{type(pl_module).__name__}_ft_schedule.yaml", dump_schedule(schedule, resolved=False)
            )
            if path:
                rank_zero_info(f"fts: generated fine-tuning schedule written to {path}")
        if self.gen_ft_sched_only:
            if not implicit:
                path = self._write_schedule(
                    f"{type(pl_module).__name__}_ft_schedule.yaml", dump_schedule(schedule, resolved=False)
                )
            self.generated_schedule_file = path  # the daemon reports where it went
            raise SystemExit(0)
        if not implicit:
            self._write_schedule(f"{type(pl_module).__name__}_ft_schedule.yaml", dump_schedule(schedule, resolved=False))
        no_decay = getattr(pl_module, "no_decay", None)
        opts = self.validation_options(None, no_decay)
        self.report = self.validate(schedule, opts)
        for w in warns + self.report.warnings:
            self._warn(w)
        self.schedule = schedule
        n = len(schedule)
        self.max_depth = n - 1 if self.max_depth < 0 else min(self.max_depth, n - 1)
        self._configured_max_epochs = trainer.max_epochs
        self._fit_max_epochs(trainer, schedule)
        self.engine = PhaseEngine(
            schedule,
            EngineSettings(
                no_decay=no_decay,
                apply_lambdas_new_pgs=self.apply_lambdas_new_pgs,
                allow_untested=self.allow_untested,
                allowed_prefixes=self.allowed_prefixes(),
                naming=NamingPolicy(self.name_param_groups),
                reinit_lr_cfg=opts.reinit_lr_cfg,
                reinit_optim_cfg=opts.reinit_optim_cfg,
                frozen_bn_track_running_stats=self.frozen_bn_track_running_stats,
            ),
        )
        self._write_schedule(f"{type(pl_module).__name__}_ft_schedule_effective.yaml", dump_schedule(schedule))
        es = trainer.early_stopping_callback
        if isinstance(es, FTSEarlyStopping):
            es.final_phase = self.depth_remaining == 0
            es.es_phase_complete = False
        self.engine.freeze_all(pl_module)
        self.engine.thaw_phase(pl_module, 0)

    # ------------------------------------------------------------------------------------------ fit start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None and self.schedule is not None
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"FinetuningScheduler supports exactly one optimizer; configure_optimizers returned {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        if getattr(optimizer, "_overlap_with_ddp", False):
            raise MisconfigurationException("ZeroRedundancyOptimizer(overlap_with_ddp=True) keeps one group; not supported")
        for cfg in trainer.lr_scheduler_configs:
            cls = type(cfg.scheduler)
            if not is_supported_scheduler(cls):
                if not self.allow_untested:
                    raise MisconfigurationException(
                        f"the scheduler from configure_optimizers ({cls.__name__}) is not supported; use one of "
                        "LambdaLR, MultiplicativeLR, StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, "
                        "ReduceLROnPlateau, CosineAnnealingWarmRestarts, ConstantLR, LinearLR (or a subclass), "
                        "or pass allow_untested=True"
                    )
                self._warn(f"allow_untested: trying scheduler {cls.__name__}")
        host = _TrainerHost(trainer)
        if self._restored is not None:
            self.initial_setup = self._phase0_setup_for_planning(pl_module, host)
            self._resume(trainer, pl_module, host)
        elif self._depth == 0 and self.engine.phase0_mismatch(optimizer, pl_module):
            if self.enforce_phase0_params:
                rank_zero_info(
                    "fts: the optimizer from configure_optimizers does not hold exactly phase 0's parameters; "
                    "rebuilding its groups for phase 0 (enforce_phase0_params=True)"
                )
                self.engine.enforce_phase0(host, pl_module)
            else:
                self._warn(
                    "the optimizer from configure_optimizers holds other parameters than phase 0 thaws "
                    "(enforce_phase0_params=False, so it is left as it is)"
                )
        # the real phase-0 group count is known only now; re-check list lengths if it differs from the default
        n0 = len(host.optimizer.param_groups)
        no_decay = getattr(pl_module, "no_decay", None)
        default_n0 = 2 if no_decay else 1
        if self._restored is None and n0 != default_n0:
            self.report = self.validate(self.schedule, self.validation_options(n0, no_decay))
        if self._restored is None:
            self.transitions.append(self._transition_record(None, 0, "start", trainer, None))
            self.initial_setup = snapshot_initial(pl_module, host.optimizer, host.lr_configs)
        self._emit("schedule", self.schedule_payload())
        self._restored = None

    def _phase0_setup_for_planning(self, pl_module: pl.LightningModule, host: _TrainerHost) -> InitialSetup:
        """On resume, rebuild the planner's phase-0 starting point from configure_optimizers' fresh output.

        At this point only phase 0 is thawed and the optimizer/schedulers are as the module built them, exactly
        as in the original run's on_fit_start; phase-0 enforcement is replayed on the stand-in copy.
        """
        assert self.engine is not None
        initial = snapshot_initial(pl_module, host.optimizer, host.lr_configs)
        if self.enforce_phase0_params and self.engine.phase0_mismatch(initial.optimizer, initial.view):  # type: ignore[arg-type]
            self.engine.enforce_phase0(SimpleHost(initial.optimizer, initial.lr_configs), initial.view)  # type: ignore[arg-type]
            initial.lr_configs = list(initial.lr_configs)
        return initial

    def schedule_payload(self) -> dict[str, Any]:
        assert self.schedule is not None
        phases = []
        for p in self.schedule.phases:
            state = "done" if p.index < self._depth else ("current" if p.index == self._depth else "pending")
            if p.index > self.max_depth:
                state = "skipped"
            phases.append({"index": p.index, "state": state, **p.to_dict()})
        groups = []
        if self.report is not None:
            groups = [[g.label for g in layout] for layout in self.report.groups]
        # implicit mode: the configs applied at every transition (the phases carry no reinit blocks of their own)
        implicit = {"reinit_lr_cfg": self.reinit_lr_cfg or None, "reinit_optim_cfg": self.reinit_optim_cfg or None}
        return {"phases": phases, "depth": self._depth, "max_depth": self.max_depth, "groups": groups,
                **copy.deepcopy(implicit)}

    # ------------------------------------------------------------------------------------------ transitions

    def should_transition(self, trainer: pl.Trainer) -> bool:
        assert self.schedule is not None
        limit = (
            self.schedule[self._depth].max_transition_epoch if self.depth_remaining > 0 else trainer.fit_loop.max_epochs
        )
        limit = -1 if limit is None else limit
        epoch_hit = 0 <= limit <= trainer.current_epoch
        if self.epoch_transitions_only:
            return epoch_hit and self.depth_remaining > 0
        es = trainer.early_stopping_callback
        final = bool(getattr(es, "final_phase", self.depth_remaining == 0))
        es_done = bool(getattr(es, "es_phase_complete", False))
        if trainer.world_size > 1:
            # an unsynced metric can make ranks disagree; any rank done moves all (a lone rank would deadlock)
            es_done = bool(trainer.strategy.reduce_boolean_decision(es_done, all=False))
            if es_done and isinstance(es, FTSEarlyStopping):
                es.es_phase_complete = True
        if self.depth_remaining == 0:
            return False
        return es_done or (not final and epoch_hit)

    def _sync_phase_from_rank_zero(self, trainer: pl.Trainer, index: int) -> None:
        """Edits arrive on rank 0 only: broadcast the phase about to start so every rank configures the same one."""
        assert self.schedule is not None
        raw = trainer.strategy.broadcast(self.schedule[index].to_dict(resolved=False), src=0)
        if raw != self.schedule[index].to_dict(resolved=False):
            problems: list[Any] = []
            phase = parse_phase(index, raw, self.base_max_lr, problems, [])
            if problems:
                raise FTSConfigError([str(p) for p in problems])
            full = self.schedule.to_dict(resolved=False)
            full[index] = phase.to_dict(resolved=False)
            schedule, _ = parse_schedule(full, self.base_max_lr)
            resolve_params(schedule, [n for n, _ in trainer.lightning_module.named_parameters()],
                           settled_through=index)  # as rank 0's replace_phase: see there
            self.replace_phase(schedule[index])

    def _transition_reason(self, trainer: pl.Trainer) -> str:
        es = trainer.early_stopping_callback
        return "early_stopping" if getattr(es, "es_phase_complete", False) else "epoch_limit"

    def _transition_record(
        self, from_depth: int | None, to_depth: int, reason: str, trainer: pl.Trainer, applied: Applied | None
    ) -> dict[str, Any]:
        return {
            "from": from_depth,
            "to": to_depth,
            "reason": reason,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "new_groups": list(applied.new_groups) if applied else [],
            "scheduler": applied.scheduler if applied else None,
            "optimizer": applied.optimizer if applied else None,
            "scheduler_reinit": bool(applied and applied.scheduler_reinit),
            "optimizer_reinit": bool(applied and applied.optimizer_reinit),
        }

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resume_plateau is not None:
            self._take_missed_plateau_step(trainer)
        if self.should_transition(trainer):
            reason = self._transition_reason(trainer)
            previous = self._depth
            for hook in list(self.before_transition):
                hook(self, previous + 1)
            if trainer.world_size > 1:
                self._sync_phase_from_rank_zero(trainer, previous + 1)
            self._depth += 1
            applied = self.step()
            record = self._transition_record(previous, self._depth, reason, trainer, applied)
            self.transitions.append(record)
            es = trainer.early_stopping_callback
            if isinstance(es, FTSEarlyStopping):
                es.reset_phase()
            rank_zero_info(f"fts: phase {self._depth} starts at epoch {trainer.current_epoch} ({reason})")
            if self.depth_remaining == 0:
                rank_zero_info(
                    f"fts: phase {self._depth} is the final phase (max_depth={self.max_depth}); training ends when "
                    + ("max_epochs is reached" if self.epoch_transitions_only else "early stopping or max_epochs ends it")
                )
            self._emit("transition", record)
            self._emit("schedule", self.schedule_payload())
        es = trainer.early_stopping_callback
        if isinstance(es, FTSEarlyStopping) and self.depth_remaining == 0:
            es.final_phase = True
        if self.log_phase and self._depth != self._logged_phase:
            # only when the phase changes (a logger write costs ~0.1 ms); the old value one step earlier makes
            # TensorBoard draw a step instead of a ramp
            step = compat.batches_that_stepped(trainer)
            for logger in trainer.loggers:
                if self._logged_phase is not None and step > 0:
                    logger.log_metrics({"fts_phase": float(self._logged_phase)}, step=step - 1)
                logger.log_metrics({"fts_phase": float(self._depth)}, step=step)
            self._logged_phase = self._depth

    def step(self) -> Applied:
        """Move the optimizer and scheduler to ``curr_depth`` (called by the transition; public for FTS parity)."""
        assert self.trainer is not None and self.pl_module is not None and self.engine is not None
        trainer, module = self.trainer, self.pl_module
        host = _TrainerHost(trainer)
        pre_state = capture_lr_state(host.optimizer, host.lr_configs)
        restored_depth = self.restore_best_ckpt() if self.restore_best else None
        try:
            applied = self.engine.advance(host, module, self._depth, pre_state, restored_depth)
        except ReinitError as err:  # validated up front; this only fires on a genuinely new failure
            raise MisconfigurationException(f"phase {self._depth}: {err}") from None
        compat.rewrap_ddp(trainer)
        es = trainer.early_stopping_callback
        if isinstance(es, FTSEarlyStopping):
            es.final_phase = self.depth_remaining == 0
        return applied

    def restore_best_ckpt(self) -> int | None:
        """Reload the best checkpoint's weights and optimizer state; return its phase (None if there is none)."""
        assert self.trainer is not None
        trainer = self.trainer
        ckpt_cb = trainer.checkpoint_callback
        path = getattr(ckpt_cb, "best_model_path", "")
        if not path or not os.path.exists(path):
            self._warn(f"restore_best: no best checkpoint to restore before phase {self._depth}; continuing")
            return None
        trainer.strategy.barrier("fts_restore_best")
        checkpoint = compat.restore_best_checkpoint(trainer, path)
        best_depth = int(getattr(ckpt_cb, "best_ckpt_depth", self._depth - 1))
        optimizer = trainer.strategy.optimizers[0]
        saved = checkpoint.get("optimizer_states", [None])[0]
        if saved is not None:
            groups = optimizer.param_groups
            n_best = len(saved["param_groups"])
            try:
                optimizer.param_groups = groups[:n_best]
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError, IndexError) as err:
                optimizer.param_groups = groups
                self._warn(f"restore_best: optimizer state of {path} does not fit the current optimizer ({err}); "
                           "restored weights only")
                return None
        for cfg, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", [])):
            cfg.scheduler.load_state_dict(state)
        return best_depth

    # ------------------------------------------------------------------------------------------ planning

    def plan(
        self,
        steps_per_epoch: int | None = None,
        max_epochs: int | None = None,
        schedule: Schedule | None = None,
        transition_epochs: Mapping[int, int] | None = None,
        **bounds: Any,
    ) -> Plan:
        """The planned per-step LRs of the whole run (``schedule`` lets a caller preview an edited schedule).

        Phases that already started use their actual start epochs unless ``transition_epochs`` says otherwise.
        ``bounds`` go to :func:`~fts_daemon.planner.plan_run` (``max_points``, ``max_steps``, ``pause``).
        """
        assert self.engine is not None and self.schedule is not None and self.trainer is not None
        if self.initial_setup is None:
            raise RuntimeError("the run has not started yet (no phase-0 optimizer to plan from)")
        trainer = self.trainer
        if steps_per_epoch is None:
            batches = trainer.num_training_batches
            if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
                # Lightning sets this when the train loader is built, just after on_fit_start
                raise RuntimeError("no plan yet: the number of steps per epoch is known once training starts")
            steps_per_epoch = int(batches)
        steps = steps_per_epoch
        epochs = max_epochs if max_epochs is not None else int(trainer.fit_loop.max_epochs or 0)
        actual = {t["to"]: t["epoch"] for t in self.transitions if t.get("from") is not None}
        actual.update(transition_epochs or {})
        return plan_run(
            self.initial_setup,
            schedule or self.schedule,
            self.engine.settings,
            self.max_depth,
            steps,
            epochs,
            actual,
            **bounds,
        )

    # ------------------------------------------------------------------------------------------ edits

    def _fit_max_epochs(self, trainer: pl.Trainer, schedule: Schedule) -> None:
        """As in FTS: when the final phase has a ``max_transition_epoch``, the run lasts until max_epochs, raised to
        the largest limit in the schedule if that is later. Called again when an edit or a resume changes the
        schedule, from the configured max_epochs: an edit that lowers the limit lowers the raise too."""
        configured = self._configured_max_epochs
        final = schedule[min(self.max_depth, len(schedule) - 1)]
        new_max = configured
        if final.max_transition_epoch >= 0:
            new_max = max(max_transition_watermark(schedule), configured if configured is not None else -1)
        if new_max == trainer.max_epochs:
            return
        if new_max != configured:
            self._warn(f"phase {final.index} is the final phase: max_epochs is raised from {configured} to {new_max}, "
                       "the largest max_transition_epoch in the schedule")
        else:
            self._warn(f"max_epochs is {new_max} again, as configured: the schedule no longer raises it")
        compat.set_max_epochs(trainer, new_max)

    def replace_phase(self, phase: Phase) -> None:
        """Swap in an edited upcoming phase (validated by the caller). Current and past phases cannot change."""
        assert self.schedule is not None and self.engine is not None
        if phase.index <= self._depth:
            raise ValueError(f"phase {phase.index} has already started (current phase is {self._depth})")
        self.schedule.phases[phase.index] = phase
        self.engine.schedule = self.schedule
        if self.pl_module is not None:
            # an edited phase may take a parameter a later phase still names (that phase's own queued edit takes it
            # out at its transition): until then the later phase leaves it out, so it is never thawed twice
            for w in resolve_params(self.schedule, [n for n, _ in self.pl_module.named_parameters()],
                                    shared_param_aliases(self.pl_module), settled_through=phase.index):
                self._warn(w)
            if self.trainer is not None:  # an edited limit moves the run's end as the YAML's would have
                self._fit_max_epochs(self.trainer, self.schedule)
            # the copy in log_dir (where FTS writes it) shows the edit too
            self._write_schedule(f"{type(self.pl_module).__name__}_ft_schedule_effective.yaml", dump_schedule(self.schedule))

    # ------------------------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None or self.engine is None or self.schedule is None:
            return {"version": STATE_VERSION, "depth": self._depth}
        optimizer = self.trainer.strategy.optimizers[0] if self.trainer.strategy.optimizers else None
        names = {id(p): n for n, p in self.pl_module.named_parameters()} if self.pl_module is not None else {}
        groups = []
        if optimizer is not None:
            for g in optimizer.param_groups:
                entry = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                entry["params"] = [names.get(id(p), "") for p in g["params"]]
                groups.append(entry)
        return {
            "version": STATE_VERSION,
            "depth": self._depth,
            "max_depth": self.max_depth,
            "schedule": self.schedule.to_dict(),
            "active_lr_spec": self.engine.active_lr_spec.to_dict() if self.engine.active_lr_spec else None,
            "active_optim_spec": self.engine.active_optim_spec.to_dict() if self.engine.active_optim_spec else None,
            "groups": groups,
            "transitions": copy.deepcopy(self.transitions),
            "pending_plateau": self._pending_plateau_step(),
        }

    def _pending_plateau_step(self) -> dict[str, Any] | None:
        """The ReduceLROnPlateau step Lightning will take after this epoch's validation, with its metric values.

        Lightning writes end-of-epoch checkpoints before it steps plateau schedulers and, resuming from such a
        checkpoint, starts the next epoch without that step. Saving the inputs lets a resume take the step itself.
        """
        trainer = self.trainer
        if trainer is None:
            return None
        epoch = int(trainer.current_epoch)
        values: dict[str, float] = {}
        for cfg in trainer.lr_scheduler_configs:
            if cfg.reduce_on_plateau and cfg.monitor and (epoch + 1) % cfg.frequency == 0:
                value = trainer.callback_metrics.get(cfg.monitor)
                if value is not None:
                    values[cfg.monitor] = float(value)
        return {"epoch": epoch, "values": values} if values else None

    def _take_missed_plateau_step(self, trainer: pl.Trainer) -> None:
        pending, self._resume_plateau = self._resume_plateau, None
        if not pending or int(trainer.current_epoch) != pending["epoch"] + 1:
            return  # the checkpoint was written mid-epoch: Lightning still takes the step itself
        for cfg in trainer.lr_scheduler_configs:
            if cfg.reduce_on_plateau and cfg.monitor in pending["values"]:
                cfg.scheduler.step(pending["values"][cfg.monitor])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "groups" not in state_dict:
            if state_dict:  # e.g. finetuning-scheduler's own state (fts_metadata, ...): nothing here can use it
                self._warn("the checkpoint's FinetuningScheduler state is not in this callback's format (saved by "
                           f"finetuning-scheduler? keys: {', '.join(sorted(map(str, state_dict))[:6])}); the "
                           "schedule starts again from phase 0")
            return
        self._restored = copy.deepcopy(state_dict)
        self._depth = int(state_dict["depth"])

    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, host: _TrainerHost) -> None:
        """Rebuild groups, optimizer and the active scheduler exactly as the checkpoint had them.

        Lightning then loads the optimizer and scheduler state dicts into these objects, so the next step uses the
        same class, arguments, interval and frequency as the uninterrupted run.
        """
        assert self.engine is not None and self._restored is not None
        state = self._restored
        saved_schedule = state.get("schedule")
        if saved_schedule:
            try:
                schedule, _ = parse_schedule(saved_schedule, self.base_max_lr)
                # an edit may have moved a parameter into a phase that has started, out of a later one whose own
                # edit (still queued, re-queued by the daemon) takes it out there
                for w in resolve_params(schedule, [n for n, _ in pl_module.named_parameters()],
                                        shared_param_aliases(pl_module), settled_through=self._depth):
                    self._warn(w)
            except ScheduleError as err:
                raise FTSConfigError([f"checkpoint schedule: {p}" for p in err.problems]) from None
            if self.schedule is not None and schedule.to_dict() != self.schedule.to_dict():
                rank_zero_info("fts: resuming with the schedule stored in the checkpoint (it includes applied edits)")
            self.schedule = schedule
            self.engine.schedule = schedule
        self.max_depth = int(state.get("max_depth", self.max_depth))
        self._fit_max_epochs(trainer, self.schedule)  # the checkpoint's schedule holds the applied edits
        self.engine.thaw_to_depth(pl_module, self._depth)
        compat.rewrap_ddp(trainer)
        params = dict(pl_module.named_parameters())
        groups = []
        for entry in state["groups"]:
            g = {k: copy.deepcopy(v) for k, v in entry.items() if k != "params"}
            g["params"] = [params[n] for n in entry["params"]]
            groups.append(g)
        optim_spec = state.get("active_optim_spec")
        if optim_spec:
            spec, problems = parse_optimizer_spec(optim_spec, None)
            if spec is None:
                raise FTSConfigError([str(p) for p in problems])
            from fts_daemon.reinit import build_optimizer

            new_opt = build_optimizer(spec, groups, self.allowed_prefixes())
            host.set_optimizer(new_opt)
            for cfg in host.lr_configs:
                cfg.scheduler.optimizer = new_opt
            self.engine.active_optim_spec = spec
        else:
            optimizer = host.optimizer
            optimizer.param_groups = []
            for g in groups:
                optimizer.add_param_group(g)
        lr_spec = state.get("active_lr_spec")
        if lr_spec:
            spec_lr, problems = parse_lr_scheduler_spec(lr_spec, None)
            if spec_lr is None:
                raise FTSConfigError([str(p) for p in problems])
            host.set_lr_configs([rebuild_scheduler(host.optimizer, spec_lr, self.allow_untested, self.allowed_prefixes())])
            self.engine.active_lr_spec = spec_lr
        pad_lambdas(host.lr_configs, len(host.optimizer.param_groups))
        self.transitions = list(state.get("transitions", []))
        self._resume_plateau = state.get("pending_plateau")
        es = trainer.early_stopping_callback
        if isinstance(es, FTSEarlyStopping):
            es.final_phase = self.depth_remaining == 0
        rank_zero_info(f"fts: resumed in phase {self._depth}")


def _init_kwargs(obj: Any, cls: type) -> dict[str, Any]:
    """Constructor arguments of a Lightning callback recovered from its attributes (for substitution)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    out = {}
    for name in params:
        if name in ("self", "args", "kwargs"):
            continue
        for attr in (name, f"_{name}"):
            if hasattr(obj, attr):
                out[name] = getattr(obj, attr)
                break
    return out

