"""A run's history: reading ``events.jsonl``, and :class:`RunHistory`, the state a late subscriber's snapshot holds.

Torch-free and ZeroMQ-free: the daemon's event bus folds every event it sends into a :class:`RunHistory` (and, on
``--resume``, first the events of earlier starts read back from the run dir); ``fts-tui replay`` reads recordings
with :func:`iter_events`.

A recording is one JSON event per line, appended by the daemon. A run that crashed, or is still being written, can
end in a torn line; that line is skipped and reported, never fatal. A bad line elsewhere is skipped and counted too,
so one corrupt record does not hide the rest of the run.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fts_daemon import events as ev

if TYPE_CHECKING:
    from fts_daemon.registry import RunRecord

EVENTS_FILE = "events.jsonl"
# lr rows (RunHistory.ingest_lr_row) gathered before they are folded into the series: ~1 s of a fast run's steps
ROW_BATCH = 512

# --------------------------------------------------------------------------------------------------- recordings


@dataclass
class ReadReport:
    """What reading a recording found."""

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


def _event(obj: Any) -> ev.Event:
    """An event from a decoded line: the light checks a recording needs (the daemon wrote these lines itself).

    ``Event.from_dict`` validates every field for data off the wire; here a wrong type only has to be caught, and
    ``KeyError``/``TypeError``/``ValueError`` mark the line unreadable, which is ~4x cheaper on a long run.
    """
    kind, seq, data = obj["kind"], obj["seq"], obj["data"]
    if obj["v"] != ev.PROTOCOL_VERSION or kind not in ev.KINDS or type(seq) is not int or type(data) is not dict:
        raise ValueError("not an fts v1 event")
    return ev.Event(kind, seq, obj["ts"], obj["run"], obj["daemon"], data, obj.get("step"), obj.get("epoch"))


def iter_events(path: Path, report: ReadReport) -> Iterator[ev.Event]:
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


def _tail_records(target: str | Path, tail_bytes: int) -> Iterator[dict[str, Any]]:
    """The JSON objects in a recording's last ``tail_bytes``, newest first (torn or blank lines skipped)."""
    path = events_path(target)
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - tail_bytes))
        data = fh.read()
    lines = data.split(b"\n")
    if size > tail_bytes:
        lines = lines[1:]  # starts mid-line
    for raw in reversed(lines):
        try:
            obj = json.loads(raw)
        except ValueError:  # blank, or a torn last line
            continue
        if isinstance(obj, dict):
            yield obj


def last_position(target: str | Path, tail_bytes: int = 256 * 1024) -> tuple[int | None, int | None]:
    """The ``(step, epoch)`` of the last event in a recording that has them (None where none in its last
    ``tail_bytes`` does): where a run that is no longer running stopped, without reading all of a long file."""
    step = epoch = None
    for obj in _tail_records(target, tail_bytes):
        if step is None and type(obj.get("step")) is int:
            step = obj["step"]
        if epoch is None and type(obj.get("epoch")) is int:
            epoch = obj["epoch"]
        if step is not None and epoch is not None:
            break
    return step, epoch


def last_phase(target: str | Path, tail_bytes: int = 256 * 1024) -> int | None:
    """The phase a recording last reported (a transition's ``to``, a schedule's ``depth``, a state or heartbeat's
    ``phase``), or None: what a resumed start reports until its own fit start says."""
    keys = {ev.TRANSITION: "to", ev.SCHEDULE: "depth", ev.STATE: "phase", ev.HEARTBEAT: "phase"}
    for obj in _tail_records(target, tail_bytes):
        data, key = obj.get("data"), keys.get(obj.get("kind"))  # type: ignore[arg-type]
        if key is not None and isinstance(data, dict) and type(data.get(key)) is int:
            return data[key]
    return None


def run_state(record: RunRecord) -> str:
    """A registered run's state, or for a dead one the end its recording holds: a daemon killed after it recorded
    ``finished`` but before it updated the registry did finish (``runs``, ``status``, the TUI)."""
    state = record.live_state
    if state == "dead" and record.run_dir:
        try:
            end = final_state(record.run_dir) or {}
        except OSError:
            return state
        if end.get("state") in ("finished", "failed"):
            return str(end["state"])
    return state


def final_state(target: str | Path, tail_bytes: int = 256 * 1024) -> dict[str, Any] | None:
    """The data of a recording's last ``state`` event when it ended the run (``finished`` or ``failed``: reason,
    checkpoint, error, train_steps, train_seconds), else None (still going, killed, or nothing in the tail)."""
    for obj in _tail_records(target, tail_bytes):
        if obj.get("kind") == ev.STATE:
            data = obj.get("data")
            if isinstance(data, dict) and data.get("state") in ("finished", "failed"):
                return data
            return None
    return None


def recorded_run_id(target: str | Path) -> str | None:
    """The run id a recording's first event carries (what ``--resume`` keeps), or None if there is none to read."""
    try:
        with open(events_path(target), "rb") as fh:
            obj = json.loads(fh.readline(64 * 1024))
    except (OSError, ValueError):
        return None
    run = obj.get("run") if isinstance(obj, dict) else None
    return run if isinstance(run, str) and run else None


def read_events(target: str | Path) -> tuple[list[ev.Event], ReadReport]:
    path = events_path(target)
    report = ReadReport(path=path)
    return list(iter_events(path, report)), report


# --------------------------------------------------------------------------------------------------- series


def _low(point: Any) -> float:
    value = point[-1]
    return value if value is not None and value == value else math.inf


def _high(point: Any) -> float:
    value = point[-1]
    return value if value is not None and value == value else -math.inf


def _extremes(points: list[Any]) -> list[Any]:
    """The lowest and the highest point (by the last element, NaN/None ignored) in their order; the ends if flat."""
    if len(points) <= 2:
        return list(points)
    values = [p[-1] for p in points]
    try:
        total = sum(values)
    except (TypeError, OverflowError):  # a None among them, or an int too large to add to a float
        total = math.nan
    if total == total:  # no NaN (nor inf and -inf together): min/max and index in C, ~3x faster than key lambdas
        lo, hi = values.index(min(values)), values.index(max(values))
    else:
        lo = min(range(len(points)), key=lambda i: _low(points[i]))
        hi = max(range(len(points)), key=lambda i: _high(points[i]))
    if lo == hi:
        lo, hi = 0, len(points) - 1
    return [points[lo], points[hi]] if lo < hi else [points[hi], points[lo]]


class Downsampler:
    """A bounded series of points (tuples whose first element is the step and last the value).

    Every point is kept until ``max_points`` would be exceeded; then each run of four stored points is replaced by
    its lowest and highest one (in step order), halving the storage, and later points are gathered into buckets of
    the same width, each stored as its lowest and highest point. So spikes and LR resets survive (keeping every k-th
    point would drop them), the whole run stays covered evenly, and :meth:`values` ends with the newest point.
    """

    def __init__(self, max_points: int):
        self.max_points = max(8, int(max_points))
        self._limit = self.max_points - 2  # stored points; values() adds a bucket's two extremes and the last point
        self.stride = 1  # raw points per stored pair once decimated (1: every point is stored as is)
        self.count = 0
        self.points: list[Any] = []
        self.pending: list[Any] = []  # raw points of the bucket being filled
        self.last: Any = None
        # JSON of points[:len(_json)]: stored points only change by appending until a compaction or a rewind, so
        # a snapshot encodes only what came since the previous one (late subscribers attach often; see values_json)
        self._json: list[bytes] = []
        self._columns: list[bytes] = []  # the same for values_packed: stored points' packed columns
        self._columns_n = 0

    def add(self, point: Any) -> None:
        self.count += 1
        self.last = point
        if self.stride == 1:
            self.points.append(point)
        else:
            self.pending.append(point)
            if len(self.pending) < self.stride:
                return
            self.points.extend(_extremes(self.pending))
            self.pending = []
        if len(self.points) > self._limit:
            self._compact()

    def extend(self, points: list[Any]) -> None:
        """``add`` each of ``points`` in turn (the same result), with the list work done a bucket at a time."""
        i, n = 0, len(points)
        if not n:
            return
        while i < n:
            if self.stride == 1:
                # up to the point whose append makes a compaction due (add checks after each append)
                take = max(1, self._limit + 1 - len(self.points))
                self.points.extend(points[i : i + take])
                i += take
            else:
                take = self.stride - len(self.pending)
                self.pending.extend(points[i : i + take])
                i += take
                if len(self.pending) < self.stride:
                    break
                self.points.extend(_extremes(self.pending))
                self.pending = []
            if len(self.points) > self._limit:
                self._compact()
        self.count += n
        self.last = points[-1]

    def _compact(self) -> None:
        pts = self.points
        n = len(pts) - len(pts) % 4
        out: list[Any] = []
        for start in range(0, n, 4):
            out.extend(_extremes(pts[start : start + 4]))
        out.extend(pts[n:])  # a partial group (only right after a rewind) stays as it is
        self.points = out
        self._forget_encoded()
        self.stride = 4 if self.stride == 1 else self.stride * 2

    def rewind(self, step: Any) -> None:
        """Forget the points at ``step`` or later (a resumed run repeats them from an earlier checkpoint)."""
        self.points = [p for p in self.points if p[0] is None or p[0] < step]
        self._forget_encoded()
        self.pending = [p for p in self.pending if p[0] is None or p[0] < step]
        self.last = self.pending[-1] if self.pending else self.points[-1] if self.points else None

    def _forget_encoded(self) -> None:
        self._json = []
        self._columns, self._columns_n = [], 0

    def _unstored(self) -> list[Any]:
        """The points values() adds after the stored ones: the filling bucket's extremes, then the newest point."""
        tail = _extremes(self.pending)
        newest = tail[-1] if tail else self.points[-1] if self.points else None
        if self.last is not None and newest is not self.last:
            tail.append(self.last)
        return tail

    def values(self) -> list[Any]:
        return self.points + self._unstored()

    def values_json(self) -> bytes:
        """``ev.dumps(self.values())``, encoding only the points stored since the last call."""
        done = self._json
        for point in self.points[len(done):]:
            done.append(_point_json(point))
        return b"[" + b",".join(done + [_point_json(p) for p in self._unstored()]) + b"]"

    def values_packed(self, width: int) -> list[bytes]:
        """The ``width`` coordinates of values() as packed columns (``ev.pack_column``, ASCII bytes). Hex of whole
        values concatenates, so only the points stored since the last call are encoded."""
        if len(self._columns) != width:
            self._columns = [b""] * width
        new = self.points[self._columns_n:]
        if new:
            self._columns = [done + _packed(c) for done, c in zip(self._columns, zip(*new))]
            self._columns_n = len(self.points)
        tail = self._unstored()
        if not tail:
            return self._columns
        return [done + _packed(p[i] for p in tail) for i, done in enumerate(self._columns)]


def _packed(values: Any) -> bytes:
    return ev.pack_floats(values).encode("ascii")


def _point_json(point: Any) -> bytes:
    """``ev.dumps(point)`` for a point (a tuple of numbers), about 4x faster than one json.dumps call per point."""
    if type(point) is tuple:
        items = [ev.number_json(x) for x in point]
        if None not in items:
            return ("[" + ",".join(items) + "]").encode("ascii")  # type: ignore[arg-type]
    return ev.dumps(point)


# --------------------------------------------------------------------------------------------------- history


class RunHistory:
    """Everything a late subscriber needs, folded from the event stream (owned by the bus's I/O thread)."""

    def __init__(self, max_points: int = 1000, recent: int = 200):
        self.max_points = max_points
        self.state: dict[str, Any] = {"state": "starting", "error": None}
        self.schedule: dict[str, Any] | None = None
        self.edits: dict[str, dict[str, Any]] = {}
        # refused queue_edit requests have no id (all would share one key): the latest few, in order
        self.refused_edits: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.transitions: list[dict[str, Any]] = []
        self._transition_daemons: list[str] = []
        self.logs: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self._lr: dict[str, Downsampler] = {}  # read through ``lr``, which folds in the rows first
        # lr events from ingest_lr_row not yet in the series: (tags, step, values), folded in batches
        self._rows: list[tuple[tuple[str, ...], int | None, Sequence[Any]]] = []
        # the short path's state: the previous event's tags, their series, and the highest step any LR series holds
        self._lr_key: tuple[str, ...] = ()
        self._lr_series: list[Downsampler] = []
        self._lr_high: Any = None
        self.metrics: dict[str, Downsampler] = {}
        self.metric_stage: dict[str, str] = {}
        self.phase = 0
        self.step: int | None = None
        self.epoch: int | None = None
        # phase 0's scheduler as a start that began in phase 0 reported it (``info.scheduler`` of its ``training``
        # event): a start resumed in a later phase cannot read it off the trainer
        self.initial_scheduler: dict[str, Any] | None = None

    def load(self, path: Path) -> ReadReport:
        """Fold in a recording (``events.jsonl`` of earlier starts of this run: ``fts-daemon start --resume``)."""
        report = ReadReport(path=path)
        for event in iter_events(path, report):
            self.ingest(event)
        return report

    def _series(self, table: dict[str, Downsampler], name: str, step: int | None) -> Downsampler:
        series = table.get(name)
        if series is None:
            series = table[name] = Downsampler(self.max_points)
        elif step is not None and series.last is not None and series.last[0] is not None and step < series.last[0]:
            series.rewind(step)  # a resumed run went back to an earlier checkpoint: its points replace those
        return series

    @property
    def lr(self) -> dict[str, Downsampler]:
        """The LR series by tag, every event ingested so far folded in."""
        if self._rows:
            self._fold_rows()
        return self._lr

    def ingest_lr_row(self, step: int | None, epoch: int | None, tags: tuple[str, ...], values: Sequence[Any]) -> None:
        """An ``lr`` event as the training thread reads it: its tags (the same tuple object while a phase keeps its
        groups) and its values in their order. The same result as :meth:`ingest_lr`, at a fraction of its cost: the
        points join the series in batches (when ``lr`` is read, or ROW_BATCH rows have gathered), a list operation
        per series rather than a call per point (one lr event per step runs through here on the bus's I/O thread,
        holding the GIL the training thread needs)."""
        if step is not None:
            self.step = step
        if epoch is not None:
            self.epoch = epoch
        self._rows.append((tags, step, values))
        if len(self._rows) >= ROW_BATCH:
            self._fold_rows()

    def ingest_lr(self, step: int | None, epoch: int | None, lrs: Mapping[str, Any]) -> None:
        """An ``lr`` event's contents (the bus's short path for events not from the tap's rows)."""
        if self._rows:
            self._fold_rows()
        if step is not None:
            self.step = step
        if epoch is not None:
            self.epoch = epoch
        self._add_lrs(step, lrs)

    def _fold_rows(self) -> None:
        rows, self._rows = self._rows, []
        start = 0
        while start < len(rows):  # runs of rows with the same tags object
            tags = rows[start][0]
            end = start + 1
            while end < len(rows) and rows[end][0] is tags:
                end += 1
            self._add_rows(tags, rows[start:end])
            start = end

    def _add_rows(self, tags: tuple[str, ...], rows: list[tuple[tuple[str, ...], int | None, Sequence[Any]]]) -> None:
        steps = [step for _, step, _ in rows]
        high = self._lr_high
        if (
            tags == self._lr_key
            and None not in steps
            and (high is None or steps[0] >= high)
            and all(a <= b for a, b in zip(steps, steps[1:]))
            and all(len(values) == len(tags) for _, _, values in rows)
        ):
            # the short path's conditions (see _add_lrs) hold for the whole run of rows: each series takes its column
            for series, column in zip(self._lr_series, zip(*(values for _, _, values in rows))):
                series.extend(list(zip(steps, column)))  # tuples of scalars: not tracked by the GC
            self._lr_high = steps[-1]
            return
        for _, step, values in rows:
            self._add_lrs(step, dict(zip(tags, values)))

    def _add_lrs(self, step: int | None, lrs: Mapping[str, Any]) -> None:
        key = tuple(lrs)
        high = self._lr_high
        if step is not None and key == self._lr_key and (high is None or step >= high):
            # the same tags as last time (a phase keeps its groups), at no earlier step than any stored point: no
            # series can need a rewind, so the per-tag lookups and checks of the general path are skipped
            for series, value in zip(self._lr_series, lrs.values()):
                series.add((step, value))  # tuples of scalars: not tracked by the GC
            self._lr_high = step
            return
        for tag, value in lrs.items():
            self._series(self._lr, tag, step).add((step, value))
        self._lr_key = key
        self._lr_series = [self._lr[tag] for tag in key]
        steps = [s.last[0] for s in self._lr.values() if s.last is not None and s.last[0] is not None]
        self._lr_high = max(steps) if steps else None

    def ingest_metric(self, step: int | None, epoch: int | None, metrics: Mapping[str, Any], stage: str) -> None:
        """A ``metric`` event's contents (the bus's short path: no :class:`~fts_daemon.events.Event` is built)."""
        if step is not None:
            self.step = step
        if epoch is not None:
            self.epoch = epoch
        for name, value in metrics.items():
            self.metric_stage.setdefault(name, stage)
            self._series(self.metrics, name, step).add((step, epoch, value))

    def ingest(self, event: ev.Event) -> None:
        data = event.data
        kind = event.kind
        if kind == ev.LR:
            self.ingest_lr(event.step, event.epoch, data.get("lrs", {}))
            return
        if kind == ev.METRIC:
            self.ingest_metric(event.step, event.epoch, data.get("metrics", {}), data.get("stage", "train"))
            return
        if event.step is not None:
            self.step = event.step
        if event.epoch is not None:
            self.epoch = event.epoch
        if kind == ev.STATE:
            self.state = dict(data)
            info = data.get("info")
            if isinstance(info, dict) and isinstance(info.get("scheduler"), dict):
                self.initial_scheduler = info["scheduler"]
        elif kind == ev.SCHEDULE:
            self.schedule = data
            self.phase = int(data.get("depth", self.phase))
        elif kind == ev.TRANSITION:
            self._add_transition(event)
        elif kind == ev.EDIT:
            edit = data.get("edit", {})
            if edit.get("id") is None:
                if "id" in edit:
                    self.refused_edits.append(edit)
            else:
                self.edits[str(edit["id"])] = edit
        elif kind == ev.LOG:
            self.logs.append({"seq": event.seq, "ts": event.ts, **data})

    def _add_transition(self, event: ev.Event) -> None:
        entry = {**event.data, "ts": event.ts}
        entry.setdefault("step", event.step)
        entry.setdefault("epoch", event.epoch)
        step = entry.get("step")
        if step is not None:
            # a resumed run that repeats a transition (it went back to a checkpoint before it) replaces the old one
            keep = [
                i for i, (t, d) in enumerate(zip(self.transitions, self._transition_daemons))
                if d == event.daemon or t.get("step") is None or t["step"] < step
            ]
            if len(keep) != len(self.transitions):
                self.transitions = [self.transitions[i] for i in keep]
                self._transition_daemons = [self._transition_daemons[i] for i in keep]
        self.transitions.append(entry)
        self._transition_daemons.append(event.daemon)
        self.phase = int(event.data.get("to", self.phase))

    def snapshot_json(self, before: dict[str, Any] | None = None, series: str = "lists") -> bytes:
        """``ev.dumps({**before, **self.snapshot(series)})`` with the series encoded incrementally (see
        :meth:`Downsampler.values_json`): the snapshot reply, which a late subscriber asks for on every attach."""
        head = ev.dumps({**(before or {}), **self._snapshot_head()})
        if series == "packed":  # hex digits need no JSON escaping: the columns go in as they are, joined once
            parts = [head[:-1], b',"series":"packed"']
            for key, table, columns in (("lr", self.lr, ev.LR_COLUMNS), ("metrics", self.metrics, ev.METRIC_COLUMNS)):
                parts.append(b',"%s":{' % key.encode("ascii"))
                for i, (name, s) in enumerate(table.items()):
                    parts += [b"," if i else b"", ev.dumps(name), b":{"]
                    if key == "metrics":
                        parts += [b'"stage":', ev.dumps(self.metric_stage.get(name, "train")), b","]
                    for j, (col, packed) in enumerate(zip(columns, s.values_packed(len(columns)))):
                        parts += [b',"' if j else b'"', col.encode("ascii"), b'":"', packed, b'"']
                    parts.append(b"}")
                parts.append(b"}")
            parts.append(b"}")
            return b"".join(parts)
        lr = b",".join(ev.dumps(tag) + b":" + s.values_json() for tag, s in self.lr.items())
        metrics = b",".join(
            ev.dumps(name) + b':{"stage":' + ev.dumps(self.metric_stage.get(name, "train")) + b',"points":'
            + s.values_json() + b"}"
            for name, s in self.metrics.items()
        )
        return head[:-1] + b',"lr":{' + lr + b'},"metrics":{' + metrics + b"}}"

    def _packed_series(self) -> dict[str, Any]:
        def columns(names: tuple[str, ...], s: Downsampler) -> dict[str, str]:
            return {k: c.decode("ascii") for k, c in zip(names, s.values_packed(len(names)))}

        lr = {tag: columns(ev.LR_COLUMNS, s) for tag, s in self.lr.items()}
        metrics = {
            name: {"stage": self.metric_stage.get(name, "train"), **columns(ev.METRIC_COLUMNS, s)}
            for name, s in self.metrics.items()
        }
        return {"series": "packed", "lr": lr, "metrics": metrics}

    def _snapshot_head(self) -> dict[str, Any]:
        return {
            "state": self.state.get("state"),
            "state_data": dict(self.state),
            "phase": self.phase,
            "step": self.step,
            "epoch": self.epoch,
            "schedule": self.schedule,
            "edits": [*self.edits.values(), *self.refused_edits],
            "transitions": list(self.transitions),
            "logs": list(self.logs),
        }

    def snapshot(self, series: str = "lists") -> dict[str, Any]:
        """The snapshot as a dict (what :meth:`snapshot_json` encodes; the bus sends that)."""
        if series == "packed":
            return {**self._snapshot_head(), **self._packed_series()}
        return {
            **self._snapshot_head(),
            "lr": {tag: s.values() for tag, s in self.lr.items()},
            "metrics": {
                name: {"stage": self.metric_stage.get(name, "train"), "points": s.values()}
                for name, s in self.metrics.items()
            },
        }
