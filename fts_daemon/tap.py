"""``DaemonTap``: the Lightning callback that turns a training run into bus events and obeys ``stop``.

Everything here runs on the training thread and only *enqueues* (``EventBus.publish`` never blocks). Per optimizer
step it publishes one ``lr`` event holding every group under LearningRateMonitor's tag names; train metrics follow
at Lightning's ``log_every_n_steps`` cadence (the points TensorBoard gets) and at epoch end; validation metrics
after each validation run. The
FinetuningScheduler's own notifications (schedule, transition, warning) are forwarded through its ``listeners``,
and queued edits are applied from its ``before_transition`` hook.

Distributed (DDP): only global rank 0 publishes and applies edits (the engine broadcasts the phase about to start
from rank 0 to every rank). On the other ranks the tap is inert (``publish=None``) except for ``stop``, which every
rank must obey at the same step: the stop flag is reduced across ranks once per step (and at epoch end).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from fts_daemon import events as ev
from fts_daemon.callback import FinetuningScheduler
from fts_daemon.compat import last_callback_metrics, skip_unused_batch_hooks
from fts_daemon.crashsafe import save_atomically
from fts_daemon.edits import EditQueue

Publish = Callable[..., Any]
# (tags, values, step, epoch): an lr event as a tuple of tags and a list of values (EventBus.publish_lr)
PublishLr = Callable[[tuple[str, ...], list[float], int, int], Any]
# callback_metrics names that are not training metrics: the FinetuningScheduler's phase (``log_phase``)
NOT_METRICS = frozenset({"fts_phase"})


def _nothing(*args: Any, **kwargs: Any) -> None:
    """``publish`` on ranks other than 0."""


def find_fts(trainer: pl.Trainer) -> FinetuningScheduler | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, FinetuningScheduler):
            return cb
    return None


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _scheduler_spec(scheduler: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of a live LR scheduler: its constructor's scalar arguments, read back from the
    attributes torch keeps them in (``StepLR.step_size``, ``LinearLR.start_factor``, ...)."""
    import inspect

    args: dict[str, Any] = {}
    try:
        params = inspect.signature(type(scheduler).__init__).parameters
    except (TypeError, ValueError):
        params = {}
    for name in params:
        if name in ("self", "optimizer", "last_epoch", "verbose"):
            continue
        value = getattr(scheduler, name, None)
        if isinstance(value, (bool, int, float, str)):
            args[name] = value
    return {"class_path": _class_path(scheduler), "init_args": args}


def run_info(trainer: pl.Trainer, pl_module: pl.LightningModule, fts: FinetuningScheduler | None) -> dict[str, Any]:
    """What the run trains, for client headers: ``model`` (class name), ``module`` (class path), ``optimizer``,
    ``scheduler`` (phase 0's, as ``{class_path, init_args}``, when the run starts in phase 0), ``max_epochs``."""
    info: dict[str, Any] = {"model": type(pl_module).__name__, "module": _class_path(pl_module)}
    if trainer.optimizers:
        info["optimizer"] = type(trainer.optimizers[0]).__name__
    configs = trainer.lr_scheduler_configs
    if configs and (fts is None or fts.curr_depth == 0):
        info["scheduler"] = _scheduler_spec(configs[0].scheduler)
    if trainer.max_epochs is not None:
        info["max_epochs"] = int(trainer.max_epochs)
    return info


def _scalar(value: Any) -> float | None:
    try:
        # a one-element tensor's item() is ~3x cheaper than float() on it during training (float() goes through
        # torch's Python-level __float__ dispatch)
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):  # non-scalar tensors and other objects are not metrics we can plot
        return None


class StopVote:
    """Whether any rank wants to stop, agreed by all ranks without stalling the step.

    Each step's end starts an asynchronous all-reduce (MAX) of this rank's wish and collects the previous step's, so
    the ranks agree one step after the request, and the communication overlaps a step's compute (about 40 us of the
    training thread per step on 2 CPU processes, against about 140 us for a blocking reduction). It runs on CPU over
    gloo (the default group under gloo, else a gloo group of its own), so under NCCL it never synchronizes the GPU.
    """

    def __init__(self) -> None:
        self.ready = False
        self._group: Any = None
        self._pending: tuple[Any, Any] | None = None

    def setup(self) -> None:
        """On every rank at the same point (``on_train_start``): creating a group is a collective."""
        import torch.distributed as dist

        if self.ready or not (dist.is_available() and dist.is_initialized()):
            return
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.ready = True

    def _start(self, wanted: bool) -> tuple[Any, Any]:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(wanted)], dtype=torch.int32)
        return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())

    def step(self, wanted: bool) -> bool:
        """The previous step's verdict; starts this step's vote (unless the verdict is to stop)."""
        decided = self._collect()
        if not decided:
            self._pending = self._start(wanted)
        return decided

    def now(self, wanted: bool) -> bool:
        """A blocking vote (epoch end: once per epoch)."""
        decided = self._collect()
        work, flag = self._start(wanted)
        work.wait()
        return decided or bool(flag.item())

    def finish(self) -> None:
        self._collect()


class DaemonTap(Callback):
    """Publishes training as events. Put it after the FinetuningScheduler in ``trainer.callbacks``.

    ``stop_event``: when set, the run stops after the current step (or, with ``stop_at_epoch_end`` set, after the
    current epoch and its validation) and a resumable checkpoint is written to ``checkpoint_dir``
    (``checkpoint_path`` tells where). An end-of-epoch checkpoint resumes exactly; a mid-epoch one resumes at the
    next batch, with the rest of that epoch drawn afresh unless the dataloader is resumable (Lightning warns).
    """

    def __init__(
        self,
        publish: Publish | None,
        edits: EditQueue | None = None,
        stop_event: threading.Event | None = None,
        checkpoint_dir: Path | None = None,
        on_train_start: Callable[[], None] | None = None,
        before_checkpoint: Callable[[], None] | None = None,
        publish_lr: PublishLr | None = None,
    ):
        super().__init__()
        # called when training starts, after Lightning installed its own signal handlers (the daemon replaces them
        # so SIGTERM means "stop gracefully" rather than Lightning's immediate exit)
        self._on_train_start = on_train_start
        # waits for a crash-safety checkpoint still being written, so the stop checkpoint is the newest on disk
        self._before_checkpoint = before_checkpoint
        self.active = publish is not None  # False on ranks other than 0: nothing is published or applied there
        self.publish: Publish = publish if publish is not None else _nothing
        # lr events, once a step: EventBus.publish_lr takes the tags and values without a dict built for them
        self.publish_lr: PublishLr = publish_lr if publish_lr is not None and publish is not None else self._lr_event
        self.edits = edits if self.active else None
        self.info: dict[str, Any] = {}  # run facts (model, config) sent with the first ``training`` state
        self.stop_event = stop_event or threading.Event()
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_path: Path | None = None
        self.stopped = False
        self.stop_at_epoch_end = threading.Event()
        self.vote = StopVote()
        self.fts: FinetuningScheduler | None = None
        self._tag_key: tuple[int | None, ...] | None = None
        self._tags: tuple[str, ...] = ()
        self._seen: dict[str, float] = {}  # metric name -> last published value
        # LR tags ever used: LearningRateMonitor puts the same names (and <tag>-momentum, <tag>-weight_decay) into
        # callback_metrics; they are not metrics (every step's LRs are in the lr events)
        self._lr_names: set[str] = set()
        self._stage: dict[str, str] = {}  # metric name -> "train" or "val" (the stage that first logged it)
        self._skip: dict[str, set[str]] = {}  # stage -> callback_metrics names that are not its metrics
        # (step, epoch) of a log_every_n_steps point whose train metrics are read at the next batch's start
        self._metrics_due: tuple[int, int] | None = None
        # training steps this process began (the daemon reports a failure before the first one as a set-up problem
        # of the config, in one line)
        self.steps_started = 0
        # (monotonic time, global step) when this start's training began and ended: the run's average rate
        self.train_began: tuple[float, int] | None = None
        self.train_ended: tuple[float, int] | None = None
        # the epoch trained last: once an epoch completes, Lightning's current_epoch already counts the next one
        self.last_epoch: int | None = None
        skip_unused_batch_hooks(self)  # Lightning need not call the per-step hooks this class does not use

    @property
    def state_key(self) -> str:
        return "DaemonTap"

    # ------------------------------------------------------------------------------------------ wiring

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.active and not trainer.is_global_zero:  # a launcher whose rank the daemon did not recognize
            self.active, self.publish, self.publish_lr, self.edits = False, _nothing, _nothing, None
        fts = find_fts(trainer)
        if fts is not None and fts is not self.fts:
            self.fts = fts
            if self.active:
                fts.listeners.append(self._on_fts)
            if self.edits is not None:
                fts.before_transition.append(self._before_transition)

    def _on_fts(self, kind: str, payload: dict[str, Any]) -> None:
        trainer = self.fts.trainer if self.fts is not None else None
        step = int(trainer.global_step) if trainer is not None else None
        epoch = int(trainer.current_epoch) if trainer is not None else None
        if kind == "schedule":
            if self.edits is not None:
                self.edits.on_schedule(payload)
            else:
                self.publish(ev.SCHEDULE, payload, step, epoch)
        elif kind == "transition":
            data = dict(payload)
            if trainer is not None and trainer.optimizers:
                data["groups"] = list(self._lr_tags(trainer))
            self.publish(ev.TRANSITION, data, step, epoch)
            self.publish(ev.STATE, {"state": "training", "error": None}, step, epoch)
        elif kind == "warning":
            self.publish(ev.LOG, {"level": "warning", "message": str(payload.get("message", ""))}, step, epoch)

    def _before_transition(self, fts: FinetuningScheduler, next_depth: int) -> None:
        trainer = fts.trainer
        step = int(trainer.global_step) if trainer is not None else None
        epoch = int(trainer.current_epoch) if trainer is not None else None
        self.publish(ev.STATE, {"state": "transition", "error": None, "to": next_depth}, step, epoch)
        assert self.edits is not None
        self.edits.apply_for(fts, next_depth)

    # ------------------------------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after the FinetuningScheduler's on_fit_start: phase-0 groups and any resumed schedule are in place
        if self.edits is not None and self.fts is not None and self.fts.schedule is not None:
            self.edits.attach(self.fts, pl_module, len(trainer.optimizers[0].param_groups))
        if not self.active:
            return
        self.info.update(run_info(trainer, pl_module, self.fts))
        data = {"state": "training", "error": None, "info": dict(self.info)}
        if trainer.ckpt_path is not None:
            # resuming: the loops (global step, epoch) are restored only after on_fit_start; 0 / 0 would be wrong
            self.publish(ev.STATE, data)
        else:
            self.publish(ev.STATE, data, int(trainer.global_step), int(trainer.current_epoch))

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has just installed its signal handlers (a SIGTERM now would end the fit with SIGTERMException,
        # without a checkpoint): take them over already, before the sanity check's validation runs
        if self._on_train_start is not None:
            self._on_train_start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_began, self.train_ended = (time.monotonic(), int(trainer.global_step)), None
        if trainer.world_size > 1:
            self.vote.setup()
        if self._on_train_start is not None:
            self._on_train_start()

    def _lr_event(self, tags: tuple[str, ...], values: list[float], step: int, epoch: int) -> None:
        """``publish_lr`` through ``publish`` (no EventBus.publish_lr given)."""
        self.publish(ev.LR, {"lrs": dict(zip(tags, values))}, step, epoch)

    def _lr_tags(self, trainer: pl.Trainer, optimizer: Any = None) -> tuple[str, ...]:
        if optimizer is None:
            optimizer = trainer.optimizers[0]
        configs = trainer.lr_scheduler_configs
        groups = optimizer.param_groups
        # tags change only when a transition adds groups or installs a new scheduler config / optimizer (new
        # objects), so identity and length are enough to know the cached names still hold
        key = (id(optimizer), id(configs[0]) if configs else None, len(groups))
        if key != self._tag_key:
            self._tag_key = key
            name = configs[0].name if configs else None
            # a new tuple only when they change: the bus caches their JSON by this object's identity
            self._tags = tuple(ev.lr_tag_names(name, type(optimizer).__name__, [g.get("name") for g in groups]))
            self._lr_names.update(self._tags)
        return self._tags

    def _not_a_metric(self, name: str) -> bool:
        """LearningRateMonitor's optimizer statistics and the callback's phase counter."""
        if name in NOT_METRICS:
            return True
        base = name.removesuffix("-momentum").removesuffix("-weight_decay")
        return base in self._lr_names

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.steps_started += 1
        if not self.active:
            self._metrics_due = None  # switched off after a log step: never publish it later under that step
            return
        if self._metrics_due is not None:
            self._publish_due_metrics(trainer)
        optimizers = trainer.optimizers
        if not optimizers:
            return
        # the LRs this optimizer step uses (LearningRateMonitor logs the same values at this point)
        optimizer = optimizers[0]
        self.publish_lr(self._lr_tags(trainer, optimizer), [float(g["lr"]) for g in optimizer.param_groups],
                        int(trainer.global_step), int(trainer.current_epoch))

    def _changed_metrics(self, callback_metrics: Mapping[str, Any], stage: str) -> dict[str, float]:
        """Metrics whose value changed since last published, classified by the stage that first logged them.

        Lightning rebuilds ``callback_metrics`` on access and keeps validation values in it during training, so
        neither identity nor presence says what was just logged; value changes do. Known validation metrics are
        reported after every validation run even when their value repeats.
        """
        out = {}
        # names that are never this stage's metrics (LR statistics, the phase, the other stage's metrics): both
        # verdicts are final (a stage is assigned once; LR tags are known before LearningRateMonitor logs them)
        skip = self._skip.setdefault(stage, set())
        for name, value in callback_metrics.items():
            if name in skip:
                continue
            if self._not_a_metric(name) or self._stage.setdefault(name, stage) != stage:
                skip.add(name)
                continue
            scalar = _scalar(value)
            if scalar is None:
                continue
            previous = self._seen.get(name)
            if stage == "train" and previous is not None and (previous == scalar or previous != previous):
                continue
            self._seen[name] = scalar
            out[name] = scalar
        return out

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # train metrics follow Lightning's own cadence, the points loggers (TensorBoard) get: log_every_n_steps.
        # Reading trainer.callback_metrics here would make Lightning compute them a second time (the costliest part
        # of a step's events); Lightning computes them right after this hook, so they are read from its cache at
        # the next batch's start (or validation's, or the epoch's end)
        stopping = self._stop_now(trainer, self.stop_event.is_set() and not self.stop_at_epoch_end.is_set(), True)
        if stopping:
            self._metrics_due = None
            self._publish_metrics(trainer, "train")
            if not self.stopped:
                self._stop(trainer)
                # Lightning validates once more when should_stop is set mid-epoch (for early stopping's sake): a stop
                # the user asked for wants none, over a partial epoch, after its checkpoint (MiniLM: 12 s)
                trainer.limit_val_batches = 0
        elif self.active and trainer.global_step % max(1, int(trainer.log_every_n_steps)) == 0:
            self._metrics_due = (int(trainer.global_step), int(trainer.current_epoch))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_epoch = int(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics_due = None  # this read covers it
        self._publish_metrics(trainer, "train")
        # stop_at_epoch_end: validation has run
        if self._stop_now(trainer, self.stop_event.is_set()) and not self.stopped:
            self._stop(trainer)

    def _stop_now(self, trainer: pl.Trainer, wanted_here: bool, per_step: bool = False) -> bool:
        """Whether to stop here; with several ranks, whether any rank wants to (``stop`` reaches rank 0 only, a
        signal may reach any), so that all stop at the same step. Every rank calls this at the same points (each
        step's end and each epoch's end), as collectives require."""
        if self.stopped:
            return False
        if trainer.world_size <= 1:
            return wanted_here
        if not self.vote.ready:  # a strategy without torch.distributed: Lightning's own (blocking) reduction
            return bool(trainer.strategy.reduce_boolean_decision(wanted_here, all=False))
        return self.vote.step(wanted_here) if per_step else self.vote.now(wanted_here)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_ended = (time.monotonic(), int(trainer.global_step))
        self.vote.finish()

    def train_span(self) -> dict[str, float | int]:
        """``train_steps`` and ``train_seconds`` of this start's fit (none if it did not reach its end)."""
        if self.train_began is None or self.train_ended is None:
            return {}
        (t0, s0), (t1, s1) = self.train_began, self.train_ended
        return {"train_steps": s1 - s0, "train_seconds": round(t1 - t0, 3)}

    def _publish_metrics(self, trainer: pl.Trainer, stage: str) -> None:
        if not self.active:
            return
        metrics = self._changed_metrics(trainer.callback_metrics, stage)
        if metrics:
            self.publish(ev.METRIC, {"metrics": metrics, "stage": stage}, int(trainer.global_step),
                         int(trainer.current_epoch))

    def _publish_due_metrics(self, trainer: pl.Trainer) -> None:
        """The train metrics of the step that ``_metrics_due`` names, from what Lightning computed after it."""
        assert self._metrics_due is not None
        step, epoch = self._metrics_due
        self._metrics_due = None
        metrics = self._changed_metrics(last_callback_metrics(trainer), "train")
        if metrics:
            self.publish(ev.METRIC, {"metrics": metrics, "stage": "train"}, step, epoch)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        if self._metrics_due is not None:  # before validation's values join the cache
            self._publish_due_metrics(trainer)
        # anything new in callback_metrics from here on was logged by validation
        for name in trainer.callback_metrics:
            self._stage.setdefault(name, "train")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:  # not results, but it tells which names validation logs
            for name in trainer.callback_metrics:
                self._stage.setdefault(name, "val")
            return
        self._publish_metrics(trainer, "val")

    def _stop(self, trainer: pl.Trainer) -> None:
        """Finish after this step: write a checkpoint now (mid-epoch, so a resume continues at the next batch)."""
        self.stopped = True
        trainer.should_stop = True
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self.publish(ev.STATE, {"state": "stopping", "error": None}, step, epoch)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if self._before_checkpoint is not None:
                self._before_checkpoint()
            path = self.checkpoint_dir / f"stop-epoch={epoch}-step={step}.ckpt"
            try:
                save_atomically(trainer, path)  # complete or absent, even if the process dies meanwhile
            except OSError as err:  # disk full, quota, read-only: say which file and why (no traceback needed)
                raise OSError(err.errno, f"cannot write checkpoint {path}: {err.strerror or err}") from None
            self.checkpoint_path = path
            self.publish(ev.LOG, {"level": "info", "message": f"checkpoint written to {path}"}, step, epoch)

    # ------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        # pending edits travel with the checkpoint too (the journal in the run dir stays the authority)
        return self.edits.state_dict() if self.edits is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.edits is not None:
            self.edits.carry(list(state_dict.get("edits", [])))
