"""Run phased fine-tuning as a daemon: build the Trainer from a LightningCLI config, publish, obey control.

:class:`Daemon` owns one run start: it binds the event bus first (so clients can attach while the model loads),
registers the run, builds model/data/Trainer with ``LightningCLI(run=False)``, attaches :class:`DaemonTap`, runs
``fit`` (resuming from the newest checkpoint in the run dir with ``resume``), and publishes the end.
``stop`` (control op, SIGTERM or SIGINT) finishes the current step, writes a checkpoint and exits 0.

Distributed: Lightning's ``ddp`` strategy runs this same command line again for every other local rank (with
``LOCAL_RANK`` set), and multi-node launchers start it on every node. A process that is not global rank 0
(:func:`launch_rank`) builds and fits the same config with the same callbacks but creates no bus, registry record,
control socket, journal, ``events.jsonl`` or ``config.yaml``: its :class:`DaemonTap` is inert except for obeying
``stop``, which it learns through a per-step all-reduce. Rank 0 passes its run id, run dir and resume checkpoint
to the ranks it spawns through ``FTS_RUN``, ``FTS_RUN_DIR`` and ``FTS_RESUME_CKPT``.

:func:`build_from_config` is shared with ``fts-daemon validate`` and ``plan``, which stop right after the engine has
checked everything (``on_fit_start``), before any training step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.bus import BindRefused, BusConfig, CurveKeys, EventBus, OpError
from fts_daemon.edits import EditError, EditQueue, Journal
from fts_daemon.history import final_state, last_phase, last_position, recorded_run_id

log = logging.getLogger("fts_daemon.runner")

EVENTS_FILE = "events.jsonl"
JOURNAL_FILE = "edits.jsonl"
EFFECTIVE_SCHEDULE_FILE = "schedule_effective.yaml"
CONFIG_FILE = "config.yaml"
MERGED_FROM = "# fts-daemon: merged from "  # config.yaml's first line: the configs of the run's first start (JSON)
LOCK_FILE = ".fts-daemon.lock"  # held (flock) by the daemon writing the run dir
CHECKPOINT_DIR = "checkpoints"
# steps in a `plan` reply unless the request says otherwise (a longer run's plan is sampled; the reply says how)
PLAN_MAX_STEPS = 20_000
# the most steps a `plan` op simulates (whole epochs; the reply's `horizon_epochs` says where it stopped): a few
# seconds of the planner's CPU. Attaching the TUI to a run of 2000 epochs of 62,500 steps made the daemon simulate
# all 125M of them, holding ~10 GB and the GIL for many minutes while training crawled at 1% of its speed
PLAN_HORIZON_STEPS = 500_000
# Lightning loggers whose records become ``log`` events (the phase-start lines come through rank_zero_info)
FORWARDED_LOGGERS = ("fts_daemon", "pytorch_lightning")
# set by rank 0 for the processes Lightning's ddp launcher starts (they run the same command line)
ENV_RUN, ENV_RUN_DIR, ENV_RESUME_CKPT = "FTS_RUN", "FTS_RUN_DIR", "FTS_RESUME_CKPT"
# launchers' rank variables: torchrun/torchelastic, Lightning's ddp launcher (LOCAL_RANK, NODE_RANK), SLURM, LSF,
# Open MPI, MPICH/Intel MPI
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK",
                  "OMPI_COMM_WORLD_RANK", "PMI_RANK")
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


_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(sorted({os.path.join(os.path.realpath(paths[k]), "") for k in ("purelib", "platlib")}))


def warning_entry(category: type[Warning], message: Any, filename: str) -> dict[str, str]:
    """The event-log entry for a Python warning raised during a run.

    A deprecation notice whose code lies in an installed package (Lightning calling a torch API torch has
    deprecated, say) is not the user's to act on: it is kept at info level, naming the package. Everything else,
    deprecations in the user's own modules included, stays a warning."""
    text = f"{category.__name__}: {message}"
    if issubclass(category, _DEPRECATIONS) and filename:
        path = os.path.realpath(filename)
        for root in _installed_roots():
            if path.startswith(root):
                package = path[len(root):].split(os.sep, 1)[0].removesuffix(".py")
                return {"level": "info", "message": f"{text} (inside {package})"}
    return {"level": "warning", "message": text}


def _check_config_yaml(path: str | os.PathLike[str]) -> None:
    """Read a config with the schedule loader's rules before LightningCLI does: jsonargparse's YAML loading keeps
    the last of duplicate keys silently, expands aliases without bound and reports a non-UTF-8 byte without the
    file's name. Here each is a one-line error naming the file (and line)."""
    from fts_daemon.schedule import MAX_SCHEDULE_BYTES, ScheduleError, parse_yaml_text

    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCHEDULE_BYTES + 1)
        parsed = parse_yaml_text(data, source=os.fspath(path))
        if not isinstance(parsed, dict):
            what = "empty" if parsed is None else f"a {type(parsed).__name__}"
            raise ConfigError(f"{os.fspath(path)}: a config must be a YAML mapping (model:, data:, trainer:, ...); "
                              f"this one is {what}")
    except OSError as err:
        raise ConfigError(f"cannot read config {os.fspath(path)}: {err.strerror or err}") from None
    except ScheduleError as err:
        source = os.fspath(path)
        raise ConfigError("\n".join(str(p) if str(p).startswith(source) else f"{source}: {p}"
                                    for p in err.problems)) from None


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*$')
_EXPECTED = re.compile(r"^Expected a <class '([^']+)'>$")


def summarize_parser_error(message: str) -> str:
    """jsonargparse's report on one bad key (a dozen lines: the Union's subtypes, one error per subtype, the whole
    given value) as one line: the key, and what was wrong with it. Anything else comes back unchanged."""
    lines = message.strip().splitlines()
    head = _PARSER_KEY.match(lines[0].strip()) if lines else None
    if head is None:
        return message
    errors: list[list[str]] = []
    given = None
    in_errors = False
    bullet = None  # indentation of the top-level error bullets; deeper lines continue the error above
    for raw in lines[1:]:
        line, indent = raw.strip(), len(raw) - len(raw.lstrip())
        if line.startswith("Given value:"):
            given, in_errors = line.removeprefix("Given value:").strip(), False
        elif line.startswith("Errors:"):
            in_errors = True
        elif in_errors and line.startswith("- ") and (bullet is None or indent <= bullet):
            bullet = indent
            errors.append([line[2:].strip()])
        elif in_errors and errors and line and not line.startswith(("Given value type:", "Subtypes:")):
            errors[-1].append(line)
    texts = [": ".join(part.rstrip(":") for part in e) for e in errors]
    # the Optional branch ("Expected a <class 'NoneType'>") says nothing when another branch says what went wrong
    # and neither does a list's "not a valid subclass" branch beside a class whose own arguments were refused
    meaningful = [t for t in texts if t != "Expected a <class 'NoneType'>"]
    specific = [t for t in meaningful if not t.startswith("Not a valid subclass of")]
    meaningful = specific or meaningful
    expected = [m.group(1) for t in meaningful if (m := _EXPECTED.match(t))]
    key = head.group(1)
    if meaningful and len(expected) == len(meaningful):
        nullable = len(meaningful) < len(texts)
        shown = given if given is not None and len(given) <= 60 else "the value given"
        return f"{key} = {shown}: expected {' or '.join(expected)}" + (" (or null)" if nullable else "")
    if meaningful:
        return f"{key}: " + "; ".join(meaningful)
    return f"{key}: " + " ".join(line.strip() for line in lines[1:] if not line.strip().startswith("Given value"))


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
        _check_config_yaml(cfg)
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
        msg = summarize_parser_error(str(err).strip() or type(err).__name__)
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
    """Make a relative ``ft_schedule`` path absolute: from the working directory if it exists there, else next to
    the config files (last first), so a config and its schedule can be used from anywhere, and the config saved in
    the run dir (``--resume`` without ``--config``) names the schedule wherever it is started from."""
    path = fts.ft_schedule
    if not isinstance(path, (str, os.PathLike)) or Path(path).is_absolute():
        return
    if Path(path).exists():
        fts.ft_schedule = str(Path(path).resolve())
        return
    for cfg in reversed(list(configs)):
        candidate = Path(cfg).resolve().parent / path
        if candidate.is_file():
            fts.ft_schedule = str(candidate)
            return


def _set_environ(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def launch_rank(environ: Any = None) -> int:
    """0 for the process that runs the daemon proper; else the first non-zero rank a launcher set in the
    environment (:data:`RANK_VARIABLES`). Decided before anything is built: the Trainer knows its global rank
    only once ``fit`` has set up the process group."""
    env = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        try:
            rank = int(env.get(name, "0") or 0)
        except ValueError:
            continue
        if rank != 0:
            return rank
    return 0


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
    checkpoint_every: int = 1  # crash safety: replace checkpoints/last.ckpt every N epochs (0: never)
    checkpoint_overhead: float = 0.01  # ... skipping epochs while the last save cost more than this share of the time
    heartbeat_s: float = 1.0
    batch_ms: float = 100.0  # shortest time between two batches of events (see BusConfig.batch_ms)
    poll_ms: int = 100  # longest idle sleep of the bus's I/O thread (see BusConfig.poll_ms)
    install_signals: bool = True
    out: TextIO | None = None  # where the banner and end lines go (None: stdout)
    callbacks: list[Any] = field(default_factory=list)  # extra Lightning callbacks (embedding, benchmarks)


class _BusLogHandler(logging.Handler):
    """Forwards log records to the bus as ``log`` events (never raises, never blocks)."""

    LEVELS = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}
    # advertising, not information about the run: Lightning's "💡 Tip:" lines recommend its cloud products
    NOISE = ("💡 Tip:", "litlogger", "litmodels")

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


# a file in the run dir cannot be written: disk full, file too large (RLIMIT_FSIZE), quota, read-only, permissions
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _is_config_error(err: BaseException) -> bool:
    """Errors whose message names what is wrong in the config or schedule (the engine's validation raises
    MisconfigurationException before the first step): a traceback would only bury the message."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    return isinstance(err, (ConfigError, MisconfigurationException))


def _raised_at(err: BaseException) -> str:
    """``" (raised in NAME, FILE:LINE)"``: the innermost frame outside the standard library, installed packages
    (torch, Lightning) and this module, i.e. the user's (or the example model's) code that raised or called in."""
    import sysconfig

    skip = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not frame.filename.startswith(skip) and frame.filename != __file__:
            return f" (raised in {frame.name}, {frame.filename}:{frame.lineno})"
    return ""


def resolve_run_location(opts: StartOptions, rank: int = 0) -> tuple[str, Path]:
    """Fill in the run id, run dir and (when resuming without ``--config``) the saved config; refuse a run id
    that is already live. Mutates ``opts`` so a detached child gets exactly the same answers.

    On a rank other than 0 (``rank``), rank 0's run id and run dir (``FTS_RUN``, ``FTS_RUN_DIR``) win, and the
    run is not checked for being live: rank 0 registered it."""
    if rank != 0:
        opts.run = os.environ.get(ENV_RUN) or opts.run
        opts.run_dir = Path(os.environ[ENV_RUN_DIR]) if os.environ.get(ENV_RUN_DIR) else opts.run_dir
    if opts.resume and opts.run_dir is None and opts.run:
        opts.run_dir = Path(registry.read_record(opts.run).run_dir)
    if opts.run_dir is not None:
        run_dir = Path(opts.run_dir).resolve()
        # a resumed run keeps the id its recording carries, whatever its directory is called
        recorded = recorded_run_id(run_dir) if opts.resume and not opts.run else None
        run_id = registry.check_run_id(opts.run or recorded or run_dir.name)
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
    if rank != 0:
        return run_id, run_dir
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
    RunDirLock(run_dir).check()
    return run_id, run_dir


class RunDirLock:
    """An advisory lock (``flock``) on a run dir, held for the daemon's life, so that two daemons never write one
    recording, journal or checkpoint directory. The kernel drops it when the process dies, however it dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def _holder(self, fd: int) -> str:
        with contextlib.suppress(OSError):
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        return ""

    def _refuse(self, fd: int) -> ConfigError:
        holder = self._holder(fd)
        return ConfigError(f"run dir {self.path.parent} is in use by another daemon ({holder or 'pid unknown'}); "
                           "stop it first or choose another --run-dir")

    def check(self) -> None:
        """Raise ConfigError if a live daemon holds the lock (nothing is taken or created)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (a new run dir) or unreadable: acquire() decides
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse(fd) from None
        finally:
            os.close(fd)  # closing drops the shared lock just taken

    def acquire(self, run_id: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = self._refuse(fd)
            os.close(fd)
            raise err from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {run_id}, pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor
            self._fd = None


# ------------------------------------------------------------------------------------------------ daemon


class _Yield:
    """The planner's pause: after ``work_s`` of simulating, sleep ``rest_s``. It runs on a thread of the training
    process, and a thread that keeps the GIL makes the training thread wait up to the switch interval (5 ms) each
    time it comes back from a torch op: training ran at ~1% of its speed beside an unbroken plan. Working a fifth
    of the time hands the GIL back every ~2 ms; a plan takes ~5× its CPU time in wall time."""

    def __init__(self, work_s: float = 0.002, rest_s: float = 0.008) -> None:
        self.work_s, self.rest_s = work_s, rest_s
        self._since = time.perf_counter()

    def __call__(self) -> None:
        if time.perf_counter() - self._since >= self.work_s:
            time.sleep(self.rest_s)
            self._since = time.perf_counter()


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
        self.write_error: str | None = None  # the first failed write to the run dir
        self._epoch_checkpoint: Any = None  # crashsafe.EpochCheckpoint, once built
        self.run_id = ""
        self.run_dir = Path(".")
        self._dir_lock = RunDirLock(self.run_dir)  # taken by _start_bus (rank 0)
        self._previous_end: dict[str, Any] = {}  # the recording's final state event when resuming (rank 0)
        self.rank = 0  # launch_rank(), set by run()
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
        self.run_id, self.run_dir = resolve_run_location(self.options, self.rank)
        self._dir_lock = RunDirLock(self.run_dir)

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

    def _prepare_run_dir(self) -> None:
        """Create the run dir and prove it takes a write, so an unwritable one fails at start with the reason.

        The process umask is tightened first: nothing the daemon writes (events.jsonl, the journal, checkpoints)
        is group- or world-writable, whatever umask it was started with.
        """
        os.umask(os.umask(0o022) | 0o022)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".fts-write-test-{os.getpid()}"
            try:
                with open(probe, "wb") as fh:
                    fh.write(b"\0" * 4096)
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
        except OSError as err:
            raise ConfigError(f"run dir {self.run_dir} is not writable: {err.strerror or err}") from None

    def _start_bus(self) -> None:
        opts = self.options
        curve = CurveKeys.from_dir(opts.curve_dir) if opts.curve_dir else None
        pub, ctl = self._endpoints()
        self._prepare_run_dir()
        self._dir_lock.acquire(self.run_id)  # before anything in the run dir is touched
        # a daemon killed while writing a checkpoint leaves its temporary file (never taken for a checkpoint, but
        # never replaced either when its name, like a stop checkpoint's, is not written again); this start holds the
        # lock, so none is being written now
        for torn in (self.run_dir / CHECKPOINT_DIR).glob(".*.ckpt.tmp"):
            with contextlib.suppress(OSError):
                torn.unlink()
        resumed_phase = None
        if opts.resume and (self.run_dir / EVENTS_FILE).is_file():
            # how the previous start ended, read before this start's own events follow it in the file
            with contextlib.suppress(OSError):
                self._previous_end = final_state(self.run_dir) or {}
                resumed_phase = last_phase(self.run_dir)
        if not opts.resume:
            self._claim_run_dir()
        bus = EventBus(
            BusConfig(
                run=self.run_id,
                pub=pub,
                ctl=ctl,
                events_path=self.run_dir / EVENTS_FILE,
                heartbeat_s=opts.heartbeat_s,
                batch_ms=opts.batch_ms,
                poll_ms=opts.poll_ms,
                history_points=opts.history_points,
                curve=curve,
                info={"pid": os.getpid(), "run_dir": str(self.run_dir), "config": self._config_paths()},
                # a resumed run's snapshots hold what earlier starts did too
                history_from=self.run_dir / EVENTS_FILE if opts.resume else None,
                on_write_error=self._on_write_error,  # events.jsonl cannot be written: stop with a checkpoint
            )
        )
        self.edits = EditQueue(Journal(self.run_dir / JOURNAL_FILE), bus.publish, self.run_dir / EFFECTIVE_SCHEDULE_FILE)
        bus.register("queue_edit", self._op_queue_edit, ("phase", "changes"))
        bus.register("cancel_edit", lambda args: self._edit_op(lambda q: q.cancel(args.get("edit_id"))), ("edit_id",))
        bus.register("list_edits", lambda args: {"edits": self._edit_op(
            lambda q: q.list(args.get("phase"), args.get("status")))}, ("phase", "status"))
        # simulating a long run takes seconds: on the bus's worker thread, so that events and heartbeats go on
        bus.register("plan", self._op_plan, ("phase", "changes", "transition_epochs", "max_steps"), slow=True)
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
            config=self._config_paths(),
            curve_server_key=curve.public.decode("ascii") if curve else None,
            # a resumed start is in the phase its recording left off in until fit start says (`runs`, `status`)
            phase=resumed_phase or 0,
        )
        registry.write_record(record)
        bus.watch(self._watch, (ev.STATE, ev.TRANSITION))
        bus.publish(ev.STATE, {"state": "starting", "error": None, "resume": opts.resume})

    def _claim_run_dir(self) -> None:
        """A fresh start in a run dir that holds another run: refused when that run trained (its recording and
        checkpoints would mix with this one's, and a later ``--resume`` could take its checkpoint); a recording and
        journal of a start that never trained (a config error, say) are moved aside."""
        recording, journal = self.run_dir / EVENTS_FILE, self.run_dir / JOURNAL_FILE
        trained = newest_checkpoint(self.run_dir) is not None
        if not trained and recording.is_file():
            with contextlib.suppress(OSError):
                trained = last_position(self.run_dir)[0] is not None
        if trained:
            earlier = recorded_run_id(self.run_dir) if recording.is_file() else None
            raise ConfigError(
                f"run dir {self.run_dir} holds {f'run {earlier!r}' if earlier else 'an earlier run'}, which trained: "
                f"continue it with `fts-daemon start --resume --run-dir {self.run_dir}`, or give this run another "
                "--run-dir (or --run)"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path, name in ((recording, f"events.{stamp}.jsonl"), (journal, f"edits.{stamp}.jsonl")):
            if path.exists():  # the earlier start's, kept beside this one's
                path.rename(self.run_dir / name)

    def _config_paths(self) -> list[str]:
        """The configs this run was started with: a resume from the saved config.yaml reports those it merged."""
        paths = [str(Path(c).resolve()) for c in self.options.configs]
        if len(paths) == 1 and Path(paths[0]) == (self.run_dir / CONFIG_FILE).resolve():
            with contextlib.suppress(OSError, ValueError, IndexError):
                first = Path(paths[0]).read_text(encoding="utf-8").splitlines()[0]
                named = json.loads(first.removeprefix(MERGED_FROM)) if first.startswith(MERGED_FROM) else None
                if isinstance(named, list) and named and all(isinstance(p, str) for p in named):
                    return named
        return paths

    def _watch(self, event: ev.Event) -> None:
        # keep the registry's state/phase current for `fts-daemon runs` (I/O thread; only on rare events)
        if event.kind == ev.STATE:
            if isinstance(event.data.get("info"), dict) and self.bus is not None:  # run facts: hello has them too
                self.bus.config.info.update(event.data["info"])
            changes: dict[str, Any] = {"state": event.data.get("state", "unknown")}
            # a resumed run starts in a later phase without a transition; a final state names the phase it ended in
            fts = self.tap.fts if self.tap is not None else None
            phase = event.data.get("phase", fts.curr_depth if fts is not None else None)
            if isinstance(phase, int) and not isinstance(phase, bool):
                changes["phase"] = phase
            registry.update_record(self.run_id, **changes)
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
        # nothing is imported here: this runs on the ops thread, and an import racing the main thread's imports of
        # Lightning at start-up ends in importlib's _DeadlockError (a TUI asks for a plan as soon as it connects)
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
            try:
                transition_epochs = {int(k): int(v) for k, v in transition_epochs.items()}
            except (TypeError, ValueError):
                raise OpError("`transition_epochs` must map phase numbers to epochs, both integers") from None
        max_steps = args.get("max_steps", PLAN_MAX_STEPS)
        if type(max_steps) is not int or max_steps < 2:
            raise OpError(f"`max_steps` must be an integer >= 2; got {max_steps!r:.40}")
        try:
            plan = fts.plan(schedule=schedule, transition_epochs=transition_epochs, max_points=max_steps,
                            max_steps=PLAN_HORIZON_STEPS, pause=_Yield())
        except (RuntimeError, ValueError) as err:  # e.g. before the train loader exists, or impossible start epochs
            # (planner.PlanError is a ValueError): an answer, not a crash
            raise OpError(str(err)) from None
        return plan.sampled(max_steps)[0].to_dict()

    def _op_stop(self, args: dict[str, Any]) -> Any:
        when = args.get("when", "step")
        if when not in ("step", "epoch"):
            raise OpError('`when` must be "step" (default) or "epoch"')
        self.request_stop(at_epoch_end=when == "epoch")
        return {"stopping": True, "state": self.bus.history.state.get("state") if self.bus else None}

    def _steps_started(self) -> int:
        return self.tap.steps_started if self.tap is not None else 0

    def _on_write_error(self, message: str) -> None:
        """A file in the run dir could not be written (disk full, quota, file size limit, read-only): stop after
        the current step with a checkpoint if one can still be written; the run ends ``failed`` saying why."""
        if self.write_error is None:
            self.write_error = message
            self._print(f"fts-daemon: {message}; stopping the run")
            self._publish(ev.LOG, {"level": "error", "message": f"{message}; stopping the run"})
        self.request_stop()

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

    def _rank_note(self) -> str:
        return f" (rank {self.rank})" if self.rank else ""

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

        from fts_daemon.crashsafe import EpochCheckpoint
        from fts_daemon.reinit import SUPPORTED_SCHEDULERS
        from fts_daemon.tap import DaemonTap

        opts = self.options
        # crash safety: last.ckpt replaced atomically at epoch ends (every rank: saving is a collective)
        self._epoch_checkpoint = EpochCheckpoint(self.run_dir / CHECKPOINT_DIR, self._on_write_error,
                                                 every_n_epochs=opts.checkpoint_every,
                                                 max_overhead=opts.checkpoint_overhead)
        self.tap = DaemonTap(
            self.bus.publish if self.bus is not None else None,  # inert on ranks other than 0
            self.edits,
            self.stop_event,
            self.run_dir / CHECKPOINT_DIR,
            on_train_start=self._install_signals,
            before_checkpoint=self._epoch_checkpoint.wait,
            publish_lr=self.bus.publish_lr if self.bus is not None else None,
        )
        overrides = list(opts.overrides)
        if not opts.progress:
            overrides.append("--trainer.enable_progress_bar=false")
        built = build_from_config(
            opts.configs,
            overrides,
            trainer_defaults={"default_root_dir": str(self.run_dir)},
            callbacks=[self.tap, self._epoch_checkpoint, *opts.callbacks],
        )
        trainer = built.trainer
        fts = find_fts_callback(trainer)
        resolve_schedule_path(fts, opts.configs)
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
            # TensorBoard gets the same LR tags the events carry (every rank: the same callbacks everywhere)
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        if self.bus is None:
            return built
        model = built.model
        module = f"{type(model).__module__}.{type(model).__qualname__}"
        self.bus.config.info.update(model=type(model).__name__, module=module)
        self.tap.info["config"] = self._config_paths()
        # what an edit may name, for clients that offer a choice
        prefixes = list(fts.allowed_prefixes())
        self.bus.config.info["allowed_prefixes"] = prefixes
        # LambdaLR and MultiplicativeLR take Python callables, which JSON cannot carry
        usable = [c for c in SUPPORTED_SCHEDULERS if c.__name__ not in ("LambdaLR", "MultiplicativeLR")]
        self.bus.config.info["schedulers"] = [
            path for path in (f"{c.__module__}.{c.__name__}" for c in usable)
            if any(path.startswith(p) for p in prefixes)
        ]
        config_yaml = built.dump()
        if config_yaml:
            origin = MERGED_FROM + json.dumps(self._config_paths()) + "\n"  # read before it is overwritten
            (self.run_dir / CONFIG_FILE).write_text(origin + config_yaml, encoding="utf-8")
        return built

    def run(self) -> int:
        """Run to the end; the exit code is 0 (finished or stopped), 1 (training failed) or 2 (could not start)."""
        self.rank = launch_rank()
        try:
            self._resolve_run()
            if self.rank == 0:  # the other ranks of a distributed run bind, register and write nothing
                self._start_bus()
        except (ConfigError, BindRefused, registry.RegistryError, OSError, RuntimeError) as err:
            self.error = one_line(err)
            self._print(f"fts-daemon{self._rank_note()}: {self.error}")
            self.exit_code = 2
            self._dir_lock.release()
            self.ready.set()
            return 2
        self.ready.set()
        if self.rank != 0:
            return self._run_other_rank()
        handler = _BusLogHandler(self._publish)
        loggers = [logging.getLogger(name) for name in FORWARDED_LOGGERS]
        for lg in loggers:
            lg.addHandler(handler)
        original_showwarning = warnings.showwarning

        def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            self._publish(ev.LOG, warning_entry(category, message, filename))
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
            self._dir_lock.release()
            registry.update_record(self.run_id, state="finished" if self.exit_code == 0 else "failed")
        return self.exit_code

    def _run_other_rank(self) -> int:
        """A rank other than 0: the same fit with the same callbacks; nothing bound, registered or written."""
        self._install_signals()
        try:
            self.exit_code = self._run_fit()
        finally:
            self._restore_signals()
        return self.exit_code

    def _resume_checkpoint(self) -> Path | None:
        if self.rank != 0 and os.environ.get(ENV_RESUME_CKPT):
            return Path(os.environ[ENV_RESUME_CKPT])  # exactly the file rank 0 resumes from
        if not self.options.resume:
            return None
        # the checkpoint the last stop wrote (and printed) when the recording ends with it, else the newest file:
        # checkpoint callbacks may write one at the same step, and the user resumes what `stop` said
        end = self._previous_end
        stopped = Path(end["checkpoint"]) if end.get("reason") == "stopped" and end.get("checkpoint") else None
        ckpt = stopped if stopped is not None and stopped.is_file() else newest_checkpoint(self.run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint (*.ckpt) in {self.run_dir}")
        if self.rank == 0:
            self._print(f"  resume  : {ckpt}")
        return ckpt

    @contextlib.contextmanager
    def _environment_for_other_ranks(self, ckpt: Path | None) -> Iterator[None]:
        """What the processes Lightning's ddp launcher starts (same command line) need to know from rank 0."""
        if self.rank != 0:
            yield
            return
        wanted = {ENV_RUN: self.run_id, ENV_RUN_DIR: str(self.run_dir), ENV_RESUME_CKPT: str(ckpt) if ckpt else None}
        saved = {name: os.environ.get(name) for name in wanted}
        _set_environ(wanted)
        try:
            yield
        finally:
            _set_environ(saved)

    def _run_fit(self) -> int:
        if self.bus is not None:
            self._banner()
        try:
            ckpt = self._resume_checkpoint()
            built = self._build()
            self.trainer = built.trainer
            if self.stop_event.is_set() and self.rank == 0:
                if self.write_error is not None:
                    self.error = f"{self.write_error}; stopped before training"
                    self._publish(ev.STATE, {"state": "failed", "error": self.error})
                    self._print(f"fts-daemon: run {self.run_id} failed: {self.error}")
                    return 1
                self._publish(ev.STATE, {"state": "finished", "error": None, "reason": "stopped before training"})
                return 0
            with self._environment_for_other_ranks(ckpt):
                built.trainer.fit(built.model, datamodule=built.datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except SystemExit as err:
            if type(err).__name__ == "SIGTERMException":  # SIGTERM reached Lightning's handler before ours took over
                self._publish(ev.STATE, {"state": "finished", "error": None, "reason": "stopped before training"})
                return 0
            if err.code in (0, None):  # gen_ft_sched_only: the schedule was written, nothing to train
                fts = find_fts_callback(self.trainer) if self.trainer is not None else None
                written = getattr(fts, "generated_schedule_file", None)
                self._publish(ev.STATE, {"state": "finished", "error": None, "reason": "schedule generated",
                                         "schedule_file": None if written is None else str(written)})
                self._print(f"fts-daemon: run {self.run_id} finished: schedule generated"
                            + (f" ({written})" if written else ""))
                return 0
            # Lightning exits this way after a KeyboardInterrupt (our second SIGINT/SIGTERM)
            self.error = f"interrupted (exit {err.code})"
            self._publish(ev.STATE, {"state": "failed", "error": self.error})
            self._print(f"fts-daemon: run {self.run_id}{self._rank_note()} {self.error}")
            return 1
        except (Exception, KeyboardInterrupt) as err:
            self.error = one_line(err)
            if self.write_error is not None and isinstance(err, OSError):  # the stop checkpoint failed as well
                self.error = f"{self.write_error}; no checkpoint could be written either: {err.strerror or err}"
            elif isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:  # disk full, quota, read-only, ...
                if not err.filename and "cannot write" not in self.error:  # a failed write() names no file
                    frames = traceback.extract_tb(err.__traceback__)
                    frame = [f for f in frames if "checkpoint" in f.name][-1:] or frames[-1:]
                    where = f" (in {frame[0].name}, {Path(frame[0].filename).name}:{frame[0].lineno})" if frame else ""
                    self.error = f"cannot write to {self.run_dir}: {err.strerror or self.error}{where}"
            elif _is_config_error(err):
                pass  # the message names what is wrong
            elif not isinstance(err, KeyboardInterrupt) and self._steps_started() == 0:
                # set-up failed before the first training step, on the config's values (an optimizer's lr, a class
                # path, a data argument): one line saying what and where, as `fts-daemon validate` reports it
                self.error = f"before the first training step: {type(err).__name__}: {self.error}{_raised_at(err)}"
            else:  # a crash in user code while training: the traceback is what they need
                traceback.print_exc(file=self._out or sys.stderr)
            self._publish(ev.STATE, {"state": "failed", "error": self.error})
            self._print(f"fts-daemon: run {self.run_id}{self._rank_note()} failed: {self.error}")
            return 1
        trainer = built.trainer
        # the final event names the last epoch that trained (a 14-epoch run ends in epoch 13, as its events say)
        epoch = self.tap.last_epoch if self.tap is not None and self.tap.last_epoch is not None else trainer.current_epoch
        stopped = bool(self.tap is not None and self.tap.stopped)
        path = self.tap.checkpoint_path if stopped else None
        data = {
            "state": "finished",
            "error": None,
            "reason": "stopped" if stopped else "completed",
            "checkpoint": str(path) if path else None,
            "phase": getattr(self.tap.fts, "curr_depth", None) if self.tap else None,
            **(self.tap.train_span() if self.tap else {}),
        }
        if self.write_error is not None:  # stopped because the run dir could not be written
            self.error = self.write_error + (f"; stopped with a checkpoint: {path}" if path else
                                             "; stopped without a checkpoint")
            data.update(state="failed", error=self.error)
            self._publish(ev.STATE, data, int(trainer.global_step), int(epoch))
            self._print(f"fts-daemon: run {self.run_id}{self._rank_note()} failed: {self.error}"
                        + (f"; resume with: fts-daemon start --resume --run-dir {self.run_dir}" if path else ""))
            return 1
        self._publish(ev.STATE, data, int(trainer.global_step), int(epoch))
        how = f"stopped; resume with: fts-daemon start --resume --run-dir {self.run_dir}" if stopped else "finished"
        if self.rank == 0:
            self._print(f"fts-daemon: run {self.run_id} {how}")
        return 0
