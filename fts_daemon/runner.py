"""Run phased fine-tuning as a daemon: build the Trainer from a LightningCLI config, publish, obey control.

:class:`Daemon` owns one run start: it binds the event bus first (so clients can attach while the model loads),
registers the run, builds model/data/Trainer with ``LightningCLI(run=False)``, attaches :class:`DaemonTap`, runs
``fit`` (resuming from the newest checkpoint in the run dir with ``resume``), and publishes the end.
``stop`` (control op, SIGTERM or SIGINT) finishes the current step, writes a checkpoint and exits 0.

:func:`build_from_config` is shared with ``fts-daemon validate`` and ``plan``, which stop right after the engine has
checked everything (``on_fit_start``), before any training step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.bus import BindRefused, BusConfig, CurveKeys, EventBus, OpError
from fts_daemon.edits import EditError, EditQueue, Journal

log = logging.getLogger("fts_daemon.runner")

EVENTS_FILE = "events.jsonl"
JOURNAL_FILE = "edits.jsonl"
EFFECTIVE_SCHEDULE_FILE = "schedule_effective.yaml"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# Lightning loggers whose records become ``log`` events (the phase-start lines come through rank_zero_info)
FORWARDED_LOGGERS = ("fts_daemon", "pytorch_lightning")
_UPSTREAM_HINT = (
    "this config names finetuning_scheduler.* classes; replace them with fts_daemon.* "
    "(e.g. fts_daemon.FinetuningScheduler, fts_daemon.FTSCheckpoint, fts_daemon.FTSEarlyStopping)"
)


class ConfigError(ValueError):
    """The config cannot be parsed or instantiated (message may span lines: one per problem)."""


@dataclass
class Built:
    cli: Any  # LightningCLI
    model: Any
    datamodule: Any
    trainer: Any

    def dump(self) -> str:
        """The merged config as YAML (what ``--resume`` without ``--config`` uses); "" if it cannot be dumped."""
        fts = find_fts_callback(self.trainer)
        for cb in self.cli.config.get("trainer.callbacks") or []:
            # pin the schedule path resolved next to the config, so the saved config works from the run dir
            if str(getattr(cb, "class_path", "")).endswith("FinetuningScheduler") and isinstance(fts.ft_schedule, str):
                cb.init_args.ft_schedule = fts.ft_schedule
        try:
            return self.cli.parser.dump(self.cli.config, skip_none=False)
        except Exception:  # a config that instantiated but cannot be dumped back is still usable
            return ""


def _quiet_lightning() -> None:
    # the tiny demo loaders run in the main process on purpose; this advice is noise in a daemon's log
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`weights_only` was not set.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    # we pass args= on purpose (our own argv is fts-daemon's, not LightningCLI's)
    warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python.*")


def build_from_config(
    configs: Sequence[str | os.PathLike[str]],
    overrides: Sequence[str] = (),
    trainer_defaults: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Built:
    """Parse LightningCLI-style configs (several compose, later wins) and instantiate model, data and Trainer.

    ``callbacks`` are appended to the config's ``trainer.callbacks``; ``overrides`` are extra CLI arguments such as
    ``--trainer.max_epochs=3``.
    """
    _quiet_lightning()
    from pytorch_lightning.cli import LightningCLI

    args: list[str] = []
    for cfg in configs:
        if not Path(cfg).is_file():
            raise ConfigError(f"config file not found: {os.fspath(cfg)}")
        args += ["--config", os.fspath(cfg)]
    args += list(overrides)
    defaults = dict(trainer_defaults or {})
    if callbacks:
        defaults["callbacks"] = list(callbacks)
    try:
        cli = LightningCLI(
            run=False,
            args=args,
            trainer_defaults=defaults,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except SystemExit as err:  # jsonargparse still exits on --help and some errors
        raise ConfigError(f"config error (exit {err.code})") from None
    except Exception as err:
        msg = str(err).strip() or type(err).__name__
        if any("finetuning_scheduler." in Path(c).read_text(encoding="utf-8", errors="replace") for c in configs):
            msg += f"\n{_UPSTREAM_HINT}"
        raise ConfigError(msg) from None
    return Built(cli=cli, model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer)


def find_fts_callback(trainer: Any) -> Any:
    from fts_daemon.tap import find_fts

    fts = find_fts(trainer)
    if fts is None:
        raise ConfigError(
            "the config has no fts_daemon.FinetuningScheduler in trainer.callbacks (the daemon runs phased "
            "fine-tuning; add one, with ft_schedule for an explicit schedule)"
        )
    return fts


def resolve_schedule_path(fts: Any, configs: Sequence[str | os.PathLike[str]]) -> None:
    """A relative ``ft_schedule`` path that does not exist from the working directory is looked up next to the
    config files (last first), so a config and its schedule can be used from anywhere."""
    path = fts.ft_schedule
    if not isinstance(path, (str, os.PathLike)) or Path(path).is_absolute() or Path(path).exists():
        return
    for cfg in reversed(list(configs)):
        candidate = Path(cfg).resolve().parent / path
        if candidate.is_file():
            fts.ft_schedule = str(candidate)
            return


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = [p for p in run_dir.rglob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def default_run_id(configs: Sequence[str | os.PathLike[str]]) -> str:
    stem = Path(configs[-1]).stem if configs else "run"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "run"
    return f"{stem[:48]}-{time.strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------------ options


@dataclass
class StartOptions:
    configs: list[str] = field(default_factory=list)
    run: str | None = None
    run_dir: Path | None = None
    runs_root: Path = Path("runs")
    resume: bool = False
    transport: str = "ipc"  # ipc (in the 0700 runtime dir) or tcp (127.0.0.1, free ports)
    pub: str | None = None  # explicit endpoints override transport
    ctl: str | None = None
    curve_dir: Path | None = None
    progress: bool = True
    overrides: list[str] = field(default_factory=list)
    history_points: int = 1000
    heartbeat_s: float = 1.0
    poll_ms: int = 100  # event batching interval of the I/O thread (see BusConfig.poll_ms)
    install_signals: bool = True
    out: TextIO | None = None  # where the banner and end lines go (None: stdout)
    callbacks: list[Any] = field(default_factory=list)  # extra Lightning callbacks (embedding, benchmarks)


class _BusLogHandler(logging.Handler):
    """Forwards log records to the bus as ``log`` events (never raises, never blocks)."""

    LEVELS = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}
    NOISE = ("litlogger",)  # advertising, not information about the run

    def __init__(self, publish: Callable[..., Any]):
        super().__init__(logging.INFO)
        self.publish = publish

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip()
            if message and not any(noise in message for noise in self.NOISE):
                self.publish(ev.LOG, {"level": self.LEVELS.get(record.levelname, "info"), "message": message})
        except Exception:  # logging must never break training
            pass


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def resolve_run_location(opts: StartOptions) -> tuple[str, Path]:
    """Fill in the run id, run dir and (when resuming without ``--config``) the saved config; refuse a run id
    that is already live. Mutates ``opts`` so a detached child gets exactly the same answers."""
    if opts.resume and opts.run_dir is None and opts.run:
        opts.run_dir = Path(registry.read_record(opts.run).run_dir)
    if opts.run_dir is not None:
        run_dir = Path(opts.run_dir).resolve()
        run_id = registry.check_run_id(opts.run or run_dir.name)
    else:
        run_id = registry.check_run_id(opts.run or default_run_id(opts.configs))
        run_dir = (opts.runs_root / run_id).resolve()
    opts.run, opts.run_dir = run_id, run_dir
    if not opts.configs:
        saved = run_dir / CONFIG_FILE
        if opts.resume and saved.is_file():
            opts.configs = [str(saved)]
        else:
            raise ConfigError("no --config given" + (f" and no {saved} to resume with" if opts.resume else ""))
    try:
        existing = registry.read_record(run_id)
    except registry.RegistryError:
        existing = None
    if (
        existing is not None
        and existing.alive
        and existing.pid != os.getpid()
        and existing.state not in registry.FINAL_STATES
    ):
        raise ConfigError(f"run {run_id!r} is already running (pid {existing.pid}); stop it first")
    return run_id, run_dir


# ------------------------------------------------------------------------------------------------ daemon


class Daemon:
    """One start of a run. ``run()`` blocks until the run ends and returns the exit code."""

    def __init__(self, options: StartOptions):
        self.options = options
        self.ready = threading.Event()  # set once the bus listens and the run is registered
        self.stop_event = threading.Event()
        self.bus: EventBus | None = None
        self.edits: EditQueue | None = None
        self.tap: Any = None
        self.trainer: Any = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.run_id = ""
        self.run_dir = Path(".")
        self._out = options.out
        self._signals_seen = 0
        self._saved_handlers: dict[int, Any] = {}

    # -------------------------------------------------------------------------------------- helpers

    def _print(self, text: str) -> None:
        out = self._out or sys.stdout
        print(text, file=out, flush=True)

    def _publish(self, kind: str, data: dict[str, Any], step: int | None = None, epoch: int | None = None) -> None:
        if self.bus is not None:
            self.bus.publish(kind, data, step, epoch)

    def request_stop(self, at_epoch_end: bool = False) -> None:
        """Stop after the current step (or the current epoch): checkpoint, publish the end, exit 0."""
        if self.stop_event.is_set():
            if not at_epoch_end and self.tap is not None:  # a plain stop overrides a pending end-of-epoch stop
                self.tap.stop_at_epoch_end.clear()
            return
        if at_epoch_end and self.tap is not None:
            self.tap.stop_at_epoch_end.set()
        self.stop_event.set()
        what = "the current epoch" if at_epoch_end else "the current step"
        self._publish(ev.LOG, {"level": "info", "message": f"stop requested: finishing {what}"})

    def _resolve_run(self) -> None:
        self.run_id, self.run_dir = resolve_run_location(self.options)

    def _endpoints(self) -> tuple[str, str]:
        opts = self.options
        if opts.pub and opts.ctl:
            return opts.pub, opts.ctl
        if opts.pub or opts.ctl:
            raise ConfigError("give both --pub and --ctl, or neither")
        if opts.transport == "tcp":
            return "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"
        if opts.transport != "ipc":
            raise ConfigError(f"unknown transport {opts.transport!r} (ipc or tcp)")
        return registry.ipc_endpoints(self.run_id)

    def _start_bus(self) -> None:
        opts = self.options
        curve = CurveKeys.from_dir(opts.curve_dir) if opts.curve_dir else None
        pub, ctl = self._endpoints()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        journal = self.run_dir / JOURNAL_FILE
        if not opts.resume and journal.exists():
            # a fresh start in a used run dir must not pick up the previous run's pending edits
            journal.rename(self.run_dir / f"edits.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        bus = EventBus(
            BusConfig(
                run=self.run_id,
                pub=pub,
                ctl=ctl,
                events_path=self.run_dir / EVENTS_FILE,
                heartbeat_s=opts.heartbeat_s,
                poll_ms=opts.poll_ms,
                history_points=opts.history_points,
                curve=curve,
                info={"pid": os.getpid(), "run_dir": str(self.run_dir), "config": list(opts.configs)},
            )
        )
        self.edits = EditQueue(Journal(journal), bus.publish, self.run_dir / EFFECTIVE_SCHEDULE_FILE)
        bus.register("queue_edit", self._op_queue_edit, ("phase", "changes"))
        bus.register("cancel_edit", lambda args: self._edit_op(lambda q: q.cancel(args.get("edit_id"))), ("edit_id",))
        bus.register("list_edits", lambda args: {"edits": self._edit_op(
            lambda q: q.list(args.get("phase"), args.get("status")))}, ("phase", "status"))
        bus.register("plan", self._op_plan, ("phase", "changes", "transition_epochs"))
        bus.register("stop", self._op_stop, ("when",))
        pub_ep, ctl_ep = bus.start()
        self.bus = bus
        record = registry.RunRecord(
            run=self.run_id,
            pid=os.getpid(),
            daemon=bus.daemon,
            run_dir=str(self.run_dir),
            pub=pub_ep,
            ctl=ctl_ep,
            config=[str(Path(c).resolve()) for c in opts.configs],
            curve_server_key=curve.public.decode("ascii") if curve else None,
        )
        registry.write_record(record)
        bus.watch(self._watch)
        bus.publish(ev.STATE, {"state": "starting", "error": None, "resume": opts.resume})

    def _watch(self, event: ev.Event) -> None:
        # keep the registry's state/phase current for `fts-daemon runs` (I/O thread; only on rare events)
        if event.kind == ev.STATE:
            registry.update_record(self.run_id, state=event.data.get("state", "unknown"))
        elif event.kind == ev.TRANSITION:
            registry.update_record(self.run_id, phase=int(event.data.get("to", 0)))

    # -------------------------------------------------------------------------------------- control ops

    def _edit_op(self, fn: Callable[[EditQueue], Any]) -> Any:
        assert self.edits is not None
        try:
            return fn(self.edits)
        except EditError as err:
            raise OpError(str(err)) from None

    def _op_queue_edit(self, args: dict[str, Any]) -> Any:
        return self._edit_op(lambda q: q.queue(args.get("phase"), args.get("changes")))

    def _op_plan(self, args: dict[str, Any]) -> Any:
        fts = self.tap.fts if self.tap is not None else None
        if fts is None or getattr(fts, "initial_setup", None) is None:
            raise OpError("no plan yet: the run has not started training (or was resumed, which has no phase-0 copy)")
        schedule = None
        if "phase" in args or "changes" in args:
            schedule = self._edit_op(lambda q: q.preview(args.get("phase"), args.get("changes")))
        transition_epochs = args.get("transition_epochs")
        if transition_epochs is not None:
            if not isinstance(transition_epochs, dict):
                raise OpError("`transition_epochs` must map phase numbers to epochs")
            transition_epochs = {int(k): int(v) for k, v in transition_epochs.items()}
        try:
            return fts.plan(schedule=schedule, transition_epochs=transition_epochs).to_dict()
        except RuntimeError as err:  # e.g. asked before the train loader exists: an answer, not a crash
            raise OpError(str(err)) from None

    def _op_stop(self, args: dict[str, Any]) -> Any:
        when = args.get("when", "step")
        if when not in ("step", "epoch"):
            raise OpError('`when` must be "step" (default) or "epoch"')
        self.request_stop(at_epoch_end=when == "epoch")
        return {"stopping": True, "state": self.bus.history.state.get("state") if self.bus else None}

    # -------------------------------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            raise KeyboardInterrupt
        self._print(f"fts-daemon: {signal.Signals(signum).name}: stopping after this step (again to abort)")
        self.request_stop()

    def _install_signals(self) -> None:
        if not self.options.install_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._saved_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._saved_handlers = {}

    # -------------------------------------------------------------------------------------- run

    def _banner(self) -> None:
        assert self.bus is not None and self.bus.endpoints is not None
        pub, ctl = self.bus.endpoints
        self._print(
            f"fts-daemon: run {self.run_id} (pid {os.getpid()}, daemon {self.bus.daemon})\n"
            f"  run dir : {self.run_dir}\n"
            f"  events  : {pub}\n"
            f"  control : {ctl}\n"
            f"  attach  : fts-tui attach {self.run_id}    status: fts-daemon status {self.run_id}    "
            f"stop: fts-daemon stop {self.run_id}"
        )

    def _build(self) -> Built:
        from pytorch_lightning.callbacks import LearningRateMonitor

        from fts_daemon.tap import DaemonTap

        opts = self.options
        assert self.edits is not None
        self.tap = DaemonTap(
            self._publish,
            self.edits,
            self.stop_event,
            self.run_dir / CHECKPOINT_DIR,
            on_train_start=self._install_signals,
        )
        overrides = list(opts.overrides)
        if not opts.progress:
            overrides.append("--trainer.enable_progress_bar=false")
        built = build_from_config(
            opts.configs,
            overrides,
            trainer_defaults={"default_root_dir": str(self.run_dir)},
            callbacks=[self.tap, *opts.callbacks],
        )
        trainer = built.trainer
        fts = find_fts_callback(trainer)
        resolve_schedule_path(fts, opts.configs)
        if self.bus is not None:  # what an edit may name, for clients that offer a choice
            from fts_daemon.reinit import SUPPORTED_SCHEDULERS

            prefixes = list(fts._allowed_prefixes())
            self.bus.config.info["allowed_prefixes"] = prefixes
            # LambdaLR and MultiplicativeLR take Python callables, which JSON cannot carry
            usable = [c for c in SUPPORTED_SCHEDULERS if c.__name__ not in ("LambdaLR", "MultiplicativeLR")]
            self.bus.config.info["schedulers"] = [
                path for path in (f"{c.__module__}.{c.__name__}" for c in usable)
                if any(path.startswith(p) for p in prefixes)
            ]
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
            # TensorBoard gets the same LR tags the events carry
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        config_yaml = built.dump()
        if config_yaml:
            (self.run_dir / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        return built

    def run(self) -> int:
        """Run to the end; the exit code is 0 (finished or stopped), 1 (training failed) or 2 (could not start)."""
        try:
            self._resolve_run()
            self._start_bus()
        except (ConfigError, BindRefused, registry.RegistryError, OSError, RuntimeError) as err:
            self.error = one_line(err)
            self._print(f"fts-daemon: {self.error}")
            self.exit_code = 2
            self.ready.set()
            return 2
        self.ready.set()
        handler = _BusLogHandler(self._publish)
        loggers = [logging.getLogger(name) for name in FORWARDED_LOGGERS]
        for lg in loggers:
            lg.addHandler(handler)
        original_showwarning = warnings.showwarning

        def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            self._publish(ev.LOG, {"level": "warning", "message": f"{category.__name__}: {message}"})
            original_showwarning(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        self._install_signals()
        try:
            self.exit_code = self._run_fit()
        finally:
            warnings.showwarning = original_showwarning
            for lg in loggers:
                lg.removeHandler(handler)
            self._restore_signals()
            assert self.bus is not None
            self.bus.close()
            registry.update_record(self.run_id, state="finished" if self.exit_code == 0 else "failed")
        return self.exit_code

    def _run_fit(self) -> int:
        self._banner()
        ckpt = None
        try:
            if self.options.resume:
                ckpt = newest_checkpoint(self.run_dir)
                if ckpt is None:
                    raise ConfigError(f"--resume: no checkpoint (*.ckpt) in {self.run_dir}")
                self._print(f"  resume  : {ckpt}")
            built = self._build()
            self.trainer = built.trainer
            if self.stop_event.is_set():
                self._publish(ev.STATE, {"state": "finished", "error": None, "reason": "stopped before training"})
                return 0
            built.trainer.fit(built.model, datamodule=built.datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except SystemExit as err:
            if err.code in (0, None):  # gen_ft_sched_only: the schedule was written, nothing to train
                self._publish(ev.STATE, {"state": "finished", "error": None, "reason": "schedule generated"})
                return 0
            # Lightning exits this way after a KeyboardInterrupt (our second SIGINT/SIGTERM)
            self.error = f"interrupted (exit {err.code})"
            self._publish(ev.STATE, {"state": "failed", "error": self.error})
            self._print(f"fts-daemon: run {self.run_id} {self.error}")
            return 1
        except (Exception, KeyboardInterrupt) as err:
            self.error = one_line(err)
            if not isinstance(err, ConfigError):  # a crash in user code: the traceback is what they need
                traceback.print_exc(file=self._out or sys.stderr)
            self._publish(ev.STATE, {"state": "failed", "error": self.error})
            self._print(f"fts-daemon: run {self.run_id} failed: {self.error}")
            return 1
        trainer = built.trainer
        stopped = bool(self.tap is not None and self.tap.stopped)
        path = self.tap.checkpoint_path if stopped else None
        data = {
            "state": "finished",
            "error": None,
            "reason": "stopped" if stopped else "completed",
            "checkpoint": str(path) if path else None,
            "phase": getattr(self.tap.fts, "curr_depth", None) if self.tap else None,
        }
        self._publish(ev.STATE, data, int(trainer.global_step), int(trainer.current_epoch))
        how = f"stopped; resume with: fts-daemon start --resume --run-dir {self.run_dir}" if stopped else "finished"
        self._print(f"fts-daemon: run {self.run_id} {how}")
        return 0
