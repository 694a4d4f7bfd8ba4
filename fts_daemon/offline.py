"""``fts-daemon validate`` and ``plan``: everything the engine checks, without a single training step.

Both build the run exactly as ``start`` would (same LightningCLI parsing and instantiation) and call ``fit`` with a
callback placed after the FinetuningScheduler that stops in ``on_fit_start``: by then the schedule was parsed,
resolved, validated with simulated group counts and dry-run instantiation (``setup``), and checked against the real
optimizer (phase-0 groups, supported scheduler, one optimizer); then the module's own schedulers are stepped as a
dry run (``initial_scheduler_problems``). No dataloader has been iterated.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fts_daemon.runner import ConfigError, build_from_config, find_fts_callback, one_line, resolve_schedule_path

CLI_FULL_PLAN_STEPS = 2_000_000  # `fts-daemon plan` keeps every step of a run up to this long (~200 MB)...
CLI_PLAN_POINTS = 20_000  # ...and about this many of a longer one's (its --json output holds them)
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class _Checked(Exception):
    """Raised from on_fit_start to leave ``fit`` once everything has been checked."""


def initial_scheduler_problems(trainer: Any) -> list[str]:
    """Step the schedulers ``configure_optimizers`` built, as a dry run would, and say where one fails or sets a
    learning rate that is not a finite number >= 0 (a module's own arguments are not in the schedule, and a wrong
    one, e.g. ``total_iters: abc``, builds fine and fails at the first step). Only for runs that are thrown away:
    it moves the real schedulers and learning rates."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from fts_daemon.reinit import DRY_RUN_STEPS, first_unusable_lr

    problems = []
    for config in getattr(trainer, "lr_scheduler_configs", []):
        sched = config.scheduler
        name = type(sched).__name__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping a scheduler before its optimizer: intended here
                for step in range(1, DRY_RUN_STEPS + 1):
                    sched.step(1.0) if isinstance(sched, ReduceLROnPlateau) else sched.step()
                    bad = first_unusable_lr(sched.optimizer)
                    if bad is not None:
                        problems.append(f"the module's scheduler {name} sets group {bad[0]}'s lr to {bad[1]!r} at "
                                        f"step {step}")
                        break
        except TypeError as err:  # a value of the wrong type; other errors (OneCycleLR past total_steps) are not
            problems.append(f"the module's scheduler {name} fails at step {step}: {one_line(err)}")
    return problems


@dataclass
class CheckResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)  # the schedule payload's phases
    groups: list[list[str]] = field(default_factory=list)  # simulated group labels per phase
    max_depth: int | None = None
    schedule_file: str | None = None  # the explicit schedule's file as resolved (None: inline or implicit)
    plan: dict[str, Any] | None = None
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _steps_per_epoch(trainer: Any, model: Any, datamodule: Any) -> int:
    source = datamodule if datamodule is not None else model
    batches = len(source.train_dataloader())
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return max(1, math.ceil(batches / max(1, int(trainer.accumulate_grad_batches))))


def check_config(
    configs: Sequence[str | os.PathLike[str]],
    overrides: Sequence[str] = (),
    plan: bool = False,
    transition_epochs: Mapping[int, int] | None = None,
    steps_per_epoch: int | None = None,
    max_epochs: int | None = None,
) -> CheckResult:
    """Validate a config like ``start`` would, training nothing; with ``plan`` also simulate its LRs."""
    import pytorch_lightning  # noqa: F401 - importing it sets its loggers to INFO; lower them afterwards

    chatty = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [lg.level for lg in chatty]
    for lg in chatty:  # "GPU available", "Seed set": noise for a command that prints a verdict
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine's warnings are collected and reported in the result
            return _check(configs, overrides, plan, transition_epochs, steps_per_epoch, max_epochs)
    finally:
        for lg, level in zip(chatty, levels):
            lg.setLevel(level)


def _check(
    configs: Sequence[str | os.PathLike[str]],
    overrides: Sequence[str],
    plan: bool,
    transition_epochs: Mapping[int, int] | None,
    steps_per_epoch: int | None,
    max_epochs: int | None,
) -> CheckResult:
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from fts_daemon.callback import FTSConfigError
    from fts_daemon.planner import PlanError

    result = CheckResult(ok=False)
    warnings_seen: list[str] = []
    captured: dict[str, Any] = {}

    class StopAfterChecks(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            fts = find_fts_callback(trainer)
            captured["fts"] = fts
            if plan:
                steps = steps_per_epoch or _steps_per_epoch(trainer, pl_module, trainer.datamodule)
                epochs = max_epochs or int(trainer.fit_loop.max_epochs or 1)
                # every step of the run is simulated; one longer than CLI_FULL_PLAN_STEPS keeps ~CLI_PLAN_POINTS of
                # them (each phase's first and last among them): a run of 125M steps held ~10 GB
                points = None if steps * epochs <= CLI_FULL_PLAN_STEPS else CLI_PLAN_POINTS
                captured["plan"] = fts.plan(steps, epochs, transition_epochs=transition_epochs, max_points=points)
            captured["initial"] = initial_scheduler_problems(trainer)  # last: it moves the real schedulers
            raise _Checked()

    fts = None
    with tempfile.TemporaryDirectory(prefix="fts-validate-") as tmp:
        try:
            built = build_from_config(
                configs, [*QUIET, *overrides], trainer_defaults={"default_root_dir": tmp}, callbacks=[StopAfterChecks()]
            )
            fts = find_fts_callback(built.trainer)
            resolve_schedule_path(fts, configs)
            fts.listeners.append(lambda kind, payload: warnings_seen.append(str(payload.get("message")))
                                 if kind == "warning" else None)
            built.trainer.fit(built.model, datamodule=built.datamodule)
        except _Checked:
            pass
        except FTSConfigError as err:
            result.problems = list(err.problems)
            return result
        except (ConfigError, MisconfigurationException) as err:
            result.problems = [line for line in str(err).splitlines() if line.strip()]
            return result
        except PlanError as err:
            result.problems = [f"--transition-epochs: {err}"]
            return result
        except Exception as err:  # a model or datamodule that fails to set up is a config problem here
            result.problems = [f"{type(err).__name__}: {one_line(err)}"]
            return result
        except SystemExit as err:  # the callback exits once it has written a generated schedule
            why = ("gen_ft_sched_only = true: this config writes the generated schedule and exits without training; "
                   "set it to false to check or plan the run") if fts is not None and fts.gen_ft_sched_only else (
                   f"the run exited during setup (SystemExit {err.code!r})")
            result.problems = [why]
            return result
    fts = captured.get("fts")
    if fts is None:
        result.problems = ["the run never reached fit start (nothing was checked)"]
        return result
    if captured.get("initial"):
        result.problems = captured["initial"]
        return result
    payload = fts.schedule_payload()
    result.ok = True
    result.warnings = warnings_seen
    result.phases = payload["phases"]
    result.groups = payload.get("groups", [])
    result.max_depth = payload.get("max_depth")
    source = getattr(fts, "ft_schedule", None)
    result.schedule_file = str(source) if isinstance(source, (str, os.PathLike)) else None
    if "plan" in captured:
        result.plan = captured["plan"].to_dict()
        result.table = captured["plan"].table()
    return result
