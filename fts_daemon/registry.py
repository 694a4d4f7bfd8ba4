"""The run registry: one small JSON file per daemon run, so clients find runs without being told endpoints.

Files live in a per-user runtime directory that only the user can enter (0700): ``$FTS_RUNTIME_DIR`` if set, else
``$XDG_RUNTIME_DIR/fts``, else ``/tmp/fts-<uid>``. The daemon's ``ipc://`` sockets live there too, which is what keeps
them private. Each record is ``<run>.json`` (0600), written atomically (temp file + rename) so a reader never sees
half a record.

Torch-free on purpose: the TUI imports this module to implement ``fts-tui attach`` with no argument.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
# States in which the daemon has exited on purpose; a record in any other state whose pid is gone died.
FINAL_STATES = ("finished", "failed")


class RegistryError(RuntimeError):
    """The runtime directory is unusable, or a run cannot be found (one-line message)."""


@dataclass
class RunRecord:
    """What ``<runtime dir>/<run>.json`` holds.

    ``pub``/``ctl`` are the endpoints to connect to (the PUB and ROUTER sockets); ``daemon`` changes at every start
    of the run (a resumed run keeps ``run`` and gets a new ``daemon``); ``curve_server_key`` is the Z85 public key
    clients need when the daemon binds with CURVE (``None`` on loopback without it).
    """

    run: str
    pid: int
    daemon: str
    run_dir: str
    pub: str
    ctl: str
    state: str = "starting"
    phase: int = 0
    config: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    curve_server_key: str | None = None
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: Any) -> RunRecord:
        if not isinstance(obj, dict):
            raise RegistryError("run record is not a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as err:
            raise RegistryError(f"run record is incomplete: {err}") from None

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    @property
    def live_state(self) -> str:
        """The recorded state, or ``dead`` when the process is gone without having said it finished."""
        if self.state in FINAL_STATES or self.alive:
            return self.state
        return "dead"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (signal 0 still reaches it). A killed detached daemon stays
    so until its parent, often init, reaps it: seconds on some hosts, while `--resume` was refused as "running"."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux), or it just went
        return False
    # the state follows the parenthesized command name, which may itself hold spaces and parentheses
    end = line.rfind(")")
    return line[end + 2 : end + 3] == "Z"


def runtime_dir(create: bool = True) -> Path:
    """The private per-user directory for run records and ipc sockets (created 0700, checked to be ours)."""
    env = os.environ.get("FTS_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR") and Path(os.environ["XDG_RUNTIME_DIR"]).is_dir():
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fts"
    else:
        path = Path(tempfile.gettempdir()) / f"fts-{os.getuid()}"
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create runtime directory {path}: {err.strerror}") from None
    if path.exists():
        _check_private(path)
    return path


def _check_private(path: Path) -> None:
    # /tmp is shared: someone else could pre-create our directory to read our sockets. Refuse theirs; tighten ours.
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"runtime directory {path} is not a plain directory")
    if st.st_uid != os.getuid():
        raise RegistryError(f"runtime directory {path} belongs to uid {st.st_uid}, not to you; set FTS_RUNTIME_DIR")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def record_path(run: str, base: Path | None = None) -> Path:
    check_run_id(run)
    return (base or runtime_dir()) / f"{run}.json"


def check_run_id(run: str) -> str:
    if not isinstance(run, str) or not RUN_ID_RE.match(run):
        raise RegistryError(
            f"invalid run id {run!r}: use letters, digits, '.', '_' and '-' (at most 80, not starting with a symbol)"
        )
    return run


def ipc_endpoints(run: str, base: Path | None = None) -> tuple[str, str]:
    """Default ``ipc://`` endpoints for a run, inside the private runtime directory."""
    base = base or runtime_dir()
    pub, ctl = base / f"{run}.pub", base / f"{run}.ctl"
    # unix socket paths are limited to ~107 bytes; fail with the fix rather than with a zmq errno
    if len(os.fsencode(str(ctl))) > 100:
        raise RegistryError(
            f"ipc socket path {ctl} is too long for a unix socket; set FTS_RUNTIME_DIR to a shorter directory "
            "or use --transport tcp"
        )
    return f"ipc://{pub}", f"ipc://{ctl}"


def write_record(record: RunRecord, base: Path | None = None) -> Path:
    """Write ``record`` atomically with mode 0600."""
    base = base or runtime_dir()
    path = record_path(record.run, base)
    record.updated = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{record.run}.", suffix=".tmp", dir=base)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record.to_dict(), fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def update_record(run: str, base: Path | None = None, **changes: Any) -> RunRecord | None:
    """Read-modify-write one record (only the daemon that owns the run calls this). None if it vanished."""
    try:
        record = read_record(run, base)
    except RegistryError:
        return None
    for k, v in changes.items():
        setattr(record, k, v)
    write_record(record, base)
    return record


def read_record(run: str, base: Path | None = None) -> RunRecord:
    path = record_path(run, base)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"no run named {run!r} in {path.parent}") from None
    try:
        return RunRecord.from_dict(json.loads(text))
    except ValueError as err:
        raise RegistryError(f"run record {path} is not valid JSON: {err}") from None


def remove_record(run: str, base: Path | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(run, base).unlink()


def iter_records(base: Path | None = None) -> Iterator[RunRecord]:
    """Every readable record, oldest start first (unreadable files are skipped: a listing must not fail)."""
    base = base or runtime_dir()
    records = []
    for path in base.glob("*.json"):
        try:
            records.append(RunRecord.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, RegistryError):
            continue
    yield from sorted(records, key=lambda r: r.started)


def find_run(run: str | None = None, base: Path | None = None) -> RunRecord:
    """The named run, or with no name the most recently started live run."""
    if run:
        return read_record(run, base)
    live = [r for r in iter_records(base) if r.alive and r.state not in FINAL_STATES]
    if not live:
        raise RegistryError(f"no live fts-daemon run in {base or runtime_dir()} (start one with `fts-daemon start`)")
    return live[-1]


def prune(base: Path | None = None) -> list[str]:
    """Remove records of runs whose process is gone; returns their ids."""
    removed = []
    for record in iter_records(base):
        if not record.alive:
            remove_record(record.run, base)
            removed.append(record.run)
    return removed
