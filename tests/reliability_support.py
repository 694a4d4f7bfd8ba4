"""Shared by the ``test_reliability_*`` modules: figures, daemons in their own processes, probe logs, event files.

Figures: every reliability test states what it measured with :func:`figure`. The line is printed (seen with
``pytest -s``), collected for the "reliability figures" section that ``tests/conftest.py`` adds to pytest's terminal
summary (seen in every run, ``make test`` included), and appended as JSON to ``$FTS_RELIABILITY_FIGURES`` when that is
set (``bench/reliability.py`` sets it and prints the table).

Torch-free on purpose (``conftest.py`` imports it): daemons run in subprocesses, started like a user starts them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
FIGURES: list[dict[str, Any]] = []
FIGURES_ENV = "FTS_RELIABILITY_FIGURES"

# tests that compare last.ckpt across runs or count lost epochs pin the cadence to every epoch (the default skips
# epochs whose save would cost more than 1% of the time, which depends on the machine's speed)
EVERY_EPOCH = ("--checkpoint-overhead", "0")


def figure(key: str, text: str, **values: Any) -> None:
    """Report one measured figure: ``key`` names the item (e.g. ``crash-resume``), ``text`` is the one-line result."""
    record = {"key": key, "text": text, **values}
    FIGURES.append(record)
    print(f"[reliability] {key}: {text}", flush=True)
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ configs


def add_probe(config: Path, log_path: Path, val_delay: float = 0.0, transition_delay: float = 0.0) -> Path:
    """Append a :class:`tests.reliability_probe.Probe` to a config written by ``daemon_support.write_config``."""
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"].append({
        "class_path": "tests.reliability_probe.Probe",
        "init_args": {"log_path": str(log_path), "val_delay": val_delay, "transition_delay": transition_delay},
    })
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def env_for(runtime: Path, **extra: str) -> dict[str, str]:
    """The environment of a daemon subprocess: a private runtime dir, this checkout importable (for ``tests.*``)."""
    env = dict(os.environ)
    env["FTS_RUNTIME_DIR"] = str(runtime)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``fts-daemon ARGS`` as a user runs it (a separate process)."""
    return subprocess.run([sys.executable, "-m", "fts_daemon.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ daemons


@dataclass
class DaemonProcess:
    """``fts-daemon start`` in the foreground of a child process (so the test can signal it)."""

    proc: subprocess.Popen
    run: str
    run_dir: Path
    env: dict[str, str]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, run: str, run_dir: Path, env: dict[str, str], config: Path | None = None, resume: bool = False,
              extra: Sequence[str] = (), preexec_fn: Callable[[], None] | None = None) -> DaemonProcess:
        args = [sys.executable, "-m", "fts_daemon.cli", "start", "--run", run, "--run-dir", str(run_dir),
                "--no-progress"]
        if config is not None:
            args += ["--config", str(config)]
        if resume:
            args.append("--resume")
        args += list(extra)
        log = run_dir.parent / f"{run_dir.name}.daemon-{time.time_ns()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        return cls(proc=proc, run=run, run_dir=run_dir, env=env, log=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def record(self, timeout: float = 120.0) -> Any:
        """This process's registry record, once its sockets are bound (fails if the process exits first)."""
        from fts_daemon import registry

        rt = Path(self.env["FTS_RUNTIME_DIR"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rec = registry.read_record(self.run, rt)
                if rec.pid == self.pid:
                    return rec
            except registry.RegistryError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before listening:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"daemon {self.run} never registered:\n{self.output()[-3000:]}")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon {self.run} did not exit within {timeout}s:\n{self.output()[-3000:]}") from None

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.kill()


class ProbeLog:
    """Reads the lines a :class:`tests.reliability_probe.Probe` appends: ``(what, index, pid, time)``."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read_new(self) -> list[tuple[str, int, int, float]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        out = []
        for line in data[:end].decode().splitlines():
            what, index, pid, ts = line.split()
            out.append((what, int(index), int(pid), float(ts)))
        return out

    def wait_for(self, match: Callable[[tuple[str, int, int, float]], bool], proc: DaemonProcess,
                 timeout: float = 120.0) -> tuple[str, int, int, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.read_new():
                if match(item):
                    return item
            if proc.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({proc.proc.returncode}) before the probe saw the target:\n"
                                     f"{proc.output()[-3000:]}")
            time.sleep(0.005)
        raise AssertionError("probe target not reached in time")


# ------------------------------------------------------------------------------------------------ event files


@dataclass
class EventFile:
    """``events.jsonl`` as a reader after a crash sees it: complete lines, and whether the last one is torn."""

    events: list[Any]
    torn_tail: bool  # the file ends inside a line (an event being written when the process died)
    bad_lines: list[int]  # 1-based numbers of complete lines that do not parse (must be none)


def read_event_file(path: Path) -> EventFile:
    from fts_daemon import events as ev

    raw = path.read_bytes()
    torn = bool(raw) and not raw.endswith(b"\n")
    lines = raw.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is empty or torn
    out, bad = [], []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            out.append(ev.event_from_json_line(line.decode("utf-8")))
        except (UnicodeDecodeError, ev.ProtocolError):
            bad.append(number)
    return EventFile(out, torn, bad)


def lr_steps(events: Sequence[Any]) -> dict[int, dict[str, float]]:
    return {e.step: e.data["lrs"] for e in events if e.kind == "lr"}


def steps_per_second(events: Sequence[Any], skip: int = 0) -> float:
    """Training throughput from the ``lr`` events' timestamps (one per optimizer step), after ``skip`` steps."""
    ts = [e.ts for e in events if e.kind == "lr"][skip:]
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return float("nan")
    return (len(ts) - 1) / (ts[-1] - ts[0])



def cpu_seconds(pid: int, main_thread_only: bool = False) -> float | None:
    """CPU time (user + system) a process has used so far, all its threads or only its main thread (the one that
    trains in ``fts-daemon start``); None where /proc is not available."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
