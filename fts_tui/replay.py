"""Read a run's ``events.jsonl`` (finished or crashed) for ``fts-tui replay``.

The daemon appends one JSON event per line. A run that crashed, or is still being written, can end in a torn
line; that line is skipped and reported, never fatal. A bad line elsewhere is skipped and counted too, so one
corrupt record does not hide the rest of the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fts_daemon.events import KINDS, PROTOCOL_VERSION, Event

EVENTS_FILE = "events.jsonl"


@dataclass
class ReplayReport:
    path: Path
    events: int = 0
    torn_tail: bool = False
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers skipped (not counting a torn tail)

    def describe(self) -> str:
        parts = [f"{self.events} events from {self.path}"]
        if self.torn_tail:
            parts.append("last line torn (skipped)")
        if self.bad_lines:
            shown = ", ".join(map(str, self.bad_lines[:5])) + ("…" if len(self.bad_lines) > 5 else "")
            parts.append(f"{len(self.bad_lines)} unreadable line(s) skipped: {shown}")
        return "; ".join(parts)


def events_path(target: str | Path) -> Path:
    """``RUN_DIR`` or a path to the jsonl file itself."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EVENTS_FILE} at {path}")
    return path


def _event(obj: Any) -> Event:
    """An event from a decoded line: the light checks a replay needs (the daemon wrote these lines itself).

    ``Event.from_dict`` validates every field for data off the wire; here a wrong type only has to be caught, and
    ``KeyError``/``TypeError``/``ValueError`` mark the line unreadable, which is ~4x cheaper on a long run.
    """
    kind, seq, data = obj["kind"], obj["seq"], obj["data"]
    if obj["v"] != PROTOCOL_VERSION or kind not in KINDS or type(seq) is not int or type(data) is not dict:
        raise ValueError("not an fts v1 event")
    return Event(kind, seq, obj["ts"], obj["run"], obj["daemon"], data, obj.get("step"), obj.get("epoch"))


def iter_events(path: Path, report: ReplayReport) -> Iterator[Event]:
    with path.open("rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    # a file that does not end with a newline ends in a line still being (or never fully) written
    last_complete = len(lines) - 1 if data.endswith(b"\n") or not data else len(lines) - 2
    numbered = [(i, raw) for i, raw in enumerate(lines) if raw.strip()]
    try:  # one decoder call for the whole file is much faster than one per line; any bad line falls back
        objs: list[Any] = json.loads(b"[" + b",".join(raw for _, raw in numbered) + b"]")
    except ValueError:
        objs = []
        for _, raw in numbered:
            try:
                objs.append(json.loads(raw))
            except ValueError:
                objs.append(None)
    for (i, _), obj in zip(numbered, objs):
        try:
            event = _event(obj)
        except (AttributeError, KeyError, TypeError, ValueError):
            if i > last_complete:
                report.torn_tail = True
            else:
                report.bad_lines.append(i + 1)
            continue
        report.events += 1
        yield event


def read_events(target: str | Path) -> tuple[list[Event], ReplayReport]:
    path = events_path(target)
    report = ReplayReport(path=path)
    return list(iter_events(path, report)), report


def read_run_meta(target: str | Path) -> dict[str, Any]:
    """Optional ``run.json`` beside the events (what the daemon registered), or ``{}``."""
    path = Path(target).expanduser()
    meta = (path if path.is_dir() else path.parent) / "run.json"
    try:
        obj = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}
