"""The run as the TUI knows it: a pure model fed by a snapshot plus events (no Textual, no sockets).

Everything the screens show is derived from :class:`RunState`. The live client and the replay reader both feed
it; the app reads it when a source says a burst was applied (and on a slow tick) and redraws only the parts named
in :meth:`RunState.take_dirty`.
History is bounded: LR and metric series are :class:`~fts_tui.series.Series` (fixed storage, min/max decimated),
the event log is a ``deque`` with a limit, so memory does not grow with the length of a run.

Sequence rules (live): those of :mod:`fts_daemon.clone` (shared with every other client): an event whose ``seq``
is at or below the last one applied is a duplicate and is dropped; one that skips numbers, or comes from another
daemon start or run, is not applied and sets :attr:`RunState.needs_resync` so the client asks for a fresh snapshot.
A replay is tolerant instead: a recording may hold several daemon starts (a resumed run), and it is read in order
as it is.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fts_daemon import clone
from fts_daemon.events import Event, train_rate, unpack_snapshot_series
from fts_tui.series import Series

# Parts of the display a change can touch (the app redraws only those).
HEADER, SCHEDULE, LR, METRICS, LOG, EDITS, PLAN = "header", "schedule", "lr", "metrics", "log", "edits", "plan"
PLANNING = "planning"  # a plan request began or ended: only the LR chart's subtitle says so
ALL_PARTS = frozenset({HEADER, SCHEDULE, LR, METRICS, LOG, EDITS, PLAN, PLANNING})

FINAL_STATES = ("finished", "failed")
# Top-level keys of a snapshot reply that are not the daemon's static info.
SNAPSHOT_KEYS = frozenset(
    {"protocol", "codec", "run", "daemon", "seq", "state", "phase", "step", "epoch", "pub", "ctl", "ops", "state_data",
     "schedule", "edits", "transitions", "logs", "lr", "metrics", "stats", "series", "snapshot_series"}
)


def short_class(class_path: str | None) -> str:
    return (class_path or "").rsplit(".", 1)[-1]


def fmt_num(value: Any) -> str:
    """Compact number: LRs as ``1e-05``, others as ``%g``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2g}"


def fmt_args(args: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={fmt_num(v)}" for k, v in (args or {}).items())


def scheduler_summary(spec: Mapping[str, Any] | None) -> str:
    """``StepLR(step_size=1, gamma=0.7)`` from a ``new_lr_scheduler`` block (or an ``{class_path, init_args}``)."""
    if not spec:
        return ""
    init = spec.get("lr_scheduler_init", spec)
    if not isinstance(init, Mapping):
        return str(init)
    return f"{short_class(init.get('class_path'))}({fmt_args(init.get('init_args'))})"


def changes_summary(changes: Mapping[str, Any]) -> str:
    parts = []
    for key, value in changes.items():
        if key == "new_lr_scheduler":
            if value is None:
                parts.append("new_lr_scheduler=none")
                continue
            init = value.get("lr_scheduler_init") if isinstance(value, Mapping) else None
            if isinstance(init, Mapping) and "class_path" not in init:  # a patch of the phase's own scheduler
                parts.append(f"init_args: {fmt_args(init.get('init_args'))}")
            elif init is not None:
                parts.append(f"scheduler={scheduler_summary(value)}")
            if isinstance(value, Mapping):
                if value.get("init_pg_lrs") is not None:
                    parts.append("init_pg_lrs=[" + ", ".join(fmt_num(v) for v in value["init_pg_lrs"]) + "]")
                if value.get("pl_lrs_cfg"):
                    parts.append(f"pl_lrs_cfg={{{fmt_args(value['pl_lrs_cfg'])}}}")
        elif key == "params" and isinstance(value, list):
            parts.append(f"params=[{len(value)}]")
        else:
            parts.append(f"{key}={fmt_num(value)}")
    return ", ".join(parts) or "no changes"


@dataclass
class EditInfo:
    id: str | None  # None: a queue_edit the daemon refused (published so every TUI logs it)
    phase: int
    changes: dict[str, Any] = field(default_factory=dict)
    status: str = "queued"
    error: str | None = None
    created: float | None = None
    applied_step: int | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditInfo:
        return cls(
            id=None if d.get("id") is None else str(d["id"]),
            phase=int(d.get("phase", -1)),
            changes=dict(d.get("changes") or {}),
            status=str(d.get("status", "queued")),
            error=d.get("error"),
            created=d.get("created"),
            applied_step=d.get("applied_step"),
            warnings=[str(w) for w in d.get("warnings") or []],
        )

    @property
    def pending(self) -> bool:
        return self.status == "queued"

    def describe(self) -> str:
        head = f"edit {self.id} for phase {self.phase}" if self.id else f"edit for phase {self.phase}"
        if self.status == "queued":
            return f"{head} queued: {changes_summary(self.changes)}"
        if self.status == "applied":
            at = f" at step {self.applied_step}" if self.applied_step is not None else ""
            return f"{head} applied{at}: {changes_summary(self.changes)}"
        if self.status == "rejected":
            return f"{head} rejected: {self.error or 'no reason given'}"
        return f"{head} {self.status}"


@dataclass
class PhaseInfo:
    index: int
    state: str = "pending"  # done | current | pending | skipped
    params: list[str] = field(default_factory=list)
    lr: float | None = None
    max_transition_epoch: int = -1
    new_lr_scheduler: dict[str, Any] | None = None
    new_optimizer: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseInfo:
        mte = d.get("max_transition_epoch", -1)
        return cls(
            index=int(d.get("index", 0)),
            state=str(d.get("state", "pending")),
            params=[str(p) for p in d.get("params") or []],
            lr=d.get("lr"),
            max_transition_epoch=-1 if mte is None else int(mte),
            new_lr_scheduler=d.get("new_lr_scheduler"),
            new_optimizer=d.get("new_optimizer"),
        )

    def to_changes_base(self) -> dict[str, Any]:
        """The phase keys an edit may change, as they are now."""
        out: dict[str, Any] = {"params": list(self.params), "max_transition_epoch": self.max_transition_epoch}
        for key in ("lr", "new_lr_scheduler", "new_optimizer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class TransitionInfo:
    from_phase: int | None
    to_phase: int
    reason: str
    epoch: int | None
    step: int | None
    scheduler: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    new_groups: list[Any] = field(default_factory=list)
    # whether the transition built a new scheduler / optimizer; None in recordings from before the daemon said so
    scheduler_reinit: bool | None = None
    optimizer_reinit: bool | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransitionInfo:
        return cls(
            from_phase=d.get("from"),
            to_phase=int(d.get("to", 0)),
            reason=str(d.get("reason", "")),
            epoch=d.get("epoch"),
            step=d.get("step"),
            scheduler=d.get("scheduler"),
            optimizer=d.get("optimizer"),
            new_groups=list(d.get("new_groups") or []),
            scheduler_reinit=None if d.get("scheduler_reinit") is None else bool(d["scheduler_reinit"]),
            optimizer_reinit=None if d.get("optimizer_reinit") is None else bool(d["optimizer_reinit"]),
        )

    def describe(self) -> str:
        reason = self.reason.replace("_", " ")
        where = f"epoch {self.epoch}, step {self.step}"
        if self.from_phase is None:
            return f"phase {self.to_phase} starts at {where} ({reason})"
        return f"phase {self.from_phase} → {self.to_phase} at {where} ({reason})"


@dataclass
class LogEntry:
    ts: float | None
    level: str  # info | warning | error
    kind: str  # transition | scheduler | edit | log | state | connection
    text: str
    step: int | None = None


# the most points per tag a chart draws of a plan (the charts are at most a few hundred braille dots wide)
PLAN_CHART_POINTS = 1024


@dataclass
class PlanData:
    """The planner's LR trajectory (``plan`` op result)."""

    steps: list[float] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    phase_starts: list[dict[str, Any]] = field(default_factory=list)
    horizon_epochs: int | None = None  # where the daemon stopped simulating a long run (None: the whole run)
    _chart: dict[str, tuple[list[float], list[float]]] | None = field(default=None, init=False, repr=False, compare=False)

    def chart_series(self) -> dict[str, tuple[list[float], list[float]]]:
        """Each tag's ``(steps, lrs)`` min/max-decimated like the live series (at most PLAN_CHART_POINTS points, the
        missing values left out), computed once: a plan holds every step of the run, and a chart redrawn after each
        burst of events would otherwise transform all of them every frame."""
        if self._chart is None:
            chart = {}
            for tag, values in self.series.items():
                series = Series(capacity=PLAN_CHART_POINTS)
                series.extend(zip(self.steps, values))
                chart[tag] = series.points()
            self._chart = chart
        return self._chart

    @classmethod
    def for_charts(cls, d: Mapping[str, Any]) -> PlanData:
        """:meth:`from_dict` with :meth:`chart_series` already computed: tens of milliseconds for a long plan, which
        clients spend on a worker thread rather than the UI's event loop."""
        plan = cls.from_dict(d)
        plan.chart_series()
        return plan

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanData:
        return cls(
            steps=[float(s) for s in d.get("steps") or []],
            series={str(k): [math.nan if v is None else float(v) for v in vs] for k, vs in (d.get("series") or {}).items()},
            phase_starts=[dict(p) for p in d.get("phase_starts") or []],
            horizon_epochs=d["horizon_epochs"] if type(d.get("horizon_epochs")) is int else None,
        )

    def start_epoch(self, phase: int) -> int | None:
        for p in self.phase_starts:
            if p.get("phase") == phase:
                return p.get("epoch")
        return None


class RunState:
    """Everything known about one run; see the module docstring for the sequence rules."""

    def __init__(self, *, series_capacity: int = 2048, log_limit: int = 1000, tolerant: bool = False) -> None:
        self.series_capacity = series_capacity
        self.log_limit = log_limit
        self.tolerant = tolerant
        self._handlers = {
            "state": self._on_state,
            "heartbeat": self._on_heartbeat,
            "schedule": self._on_schedule,
            "transition": self._on_transition,
            "lr": self._on_lr,
            "metric": self._on_metric,
            "edit": self._on_edit,
            "log": self._on_log,
        }
        self.connection = "replay" if tolerant else "connecting"
        self.last_heard: float | None = None  # client's monotonic clock at the last message from the daemon
        self.connection_note = ""
        self.plan: PlanData | None = None
        self.plan_error: str | None = None
        self.planning = False  # a plan request is in flight (a long run's takes tens of seconds)
        # counters that survive reset(): widgets and the client compare them with what they last saw
        self.log_epoch = 0  # bumped when the log is rebuilt rather than appended to
        self.schedule_rev = 0  # bumped by every schedule load (the client re-plans when it moves)
        self.reset()

    # ------------------------------------------------------------------------------------------------ basics

    def reset(self) -> None:
        self.run: str | None = None
        self.daemon: str | None = None
        self.info: dict[str, Any] = {}
        self.status = "starting"
        self.error: str | None = None
        self.end_reason: str | None = None  # of a finished run: "completed", "stopped", ...
        self.phase = 0
        self.max_depth: int | None = None
        self.reinit_lr_cfg: Mapping[str, Any] | None = None  # implicit mode's, from the schedule event
        self.reinit_optim_cfg: Mapping[str, Any] | None = None
        self.epoch: int | None = None
        self.step: int | None = None
        self.last_seq = 0
        self.needs_resync = False
        self.resync_reason = ""
        self.phases: list[PhaseInfo] = []
        self.groups: list[list[str]] = []
        self.edits: dict[str, EditInfo] = {}
        self.transitions: list[TransitionInfo] = []
        self.lr: dict[str, Series] = {}
        self.metrics: dict[str, Series] = {}
        self.metric_stage: dict[str, str] = {}
        self.log: deque[LogEntry] = deque(maxlen=self.log_limit)
        self.log_total = 0  # entries ever added (the log widget appends those it has not shown)
        self.events_applied = 0
        self.last_event_ts: float | None = None
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self.run_rate: float | None = None  # a finished run's average steps/s, from the daemon's final state
        self._dirty: set[str] = set(ALL_PARTS)

    def mark(self, *parts: str) -> None:
        self._dirty.update(parts)

    def take_dirty(self) -> set[str]:
        dirty, self._dirty = self._dirty, set()
        return dirty

    def add_log(self, level: str, kind: str, text: str, ts: float | None = None, step: int | None = None) -> None:
        """Append to the event log (``ts`` in unix seconds, None when unknown)."""
        self.log.append(LogEntry(ts=ts, level=level, kind=kind, text=text, step=step))
        self.log_total += 1
        self.mark(LOG)

    def set_connection(self, connection: str, note: str = "") -> None:
        if (connection, note) != (self.connection, self.connection_note):
            self.connection, self.connection_note = connection, note
            self.mark(HEADER)

    # ------------------------------------------------------------------------------------------------ events

    def apply(self, event: Event | Mapping[str, Any]) -> bool:
        """Apply one event; False when it was dropped (duplicate, or a resync is needed first)."""
        ev = event if isinstance(event, Event) else Event.from_dict(event)
        if self.daemon is not None:
            action, reason = clone.verdict(ev, self.last_seq, self.daemon, self.run)
            if action == clone.SKIP:
                return False
            if action == clone.RESNAPSHOT:
                if not self.tolerant:
                    self._want_resync(reason)
                    return False
                if ev.daemon != self.daemon or ev.run != self.run:
                    self.last_seq = 0  # a recording that spans a resumed run: the next start numbers from 1
                # a replay applies what the recording holds, gaps included
        self.run, self.daemon, self.last_seq = ev.run, ev.daemon, ev.seq
        self.events_applied += 1
        self.last_event_ts = ev.ts
        if ev.step is not None and (self.step is None or ev.step >= self.step or ev.kind == "transition"):
            self.step = ev.step
        if ev.epoch is not None and (self.epoch is None or ev.epoch >= self.epoch or ev.kind == "transition"):
            self.epoch = ev.epoch
        handler = self._handlers.get(ev.kind)
        if handler is not None:
            handler(ev)
        self._dirty.add(HEADER)
        return True

    def _want_resync(self, reason: str) -> None:
        if not self.needs_resync:
            self.needs_resync, self.resync_reason = True, reason
            self.mark(HEADER)

    def _on_state(self, ev: Event) -> None:
        data = ev.data
        if isinstance(data.get("info"), Mapping):
            self.info.update(data["info"])
        new = str(data.get("state", self.status))
        changed = new != self.status
        self.status = new
        if data.get("error"):
            self.error = str(data["error"])
        if data.get("reason") is not None:
            self.end_reason = str(data["reason"])
        self._take_run_rate(data)
        if changed and new not in ("training", "transition"):
            level = "error" if new == "failed" else "info"
            text = f"run {new}" + (f": {self.error}" if new == "failed" and self.error else "")
            if new == "finished" and self.end_reason not in (None, "completed"):
                text += f" ({self.end_reason})"  # stopped, schedule generated, stopped before training
            self.add_log(level, "state", text, ev.ts, ev.step)

    def _take_run_rate(self, data: Mapping[str, Any]) -> None:
        rate = train_rate(data)
        if rate is not None:
            self.run_rate = rate

    def _on_heartbeat(self, ev: Event) -> None:
        if "state" in ev.data:
            self.status = str(ev.data["state"])
        if isinstance(ev.data.get("phase"), int):
            self.phase = ev.data["phase"]

    def _on_schedule(self, ev: Event) -> None:
        self.load_schedule(ev.data)

    def load_schedule(self, data: Mapping[str, Any]) -> None:
        self.schedule_rev += 1
        self.phases = [PhaseInfo.from_dict(p) for p in data.get("phases") or []]
        self.groups = [list(g) for g in data.get("groups") or []]
        if isinstance(data.get("depth"), int):
            self.phase = data["depth"]
        if data.get("max_depth") is not None:
            self.max_depth = int(data["max_depth"])
        # implicit mode: the scheduler (optimizer) config built afresh at every transition
        self.reinit_lr_cfg = data.get("reinit_lr_cfg") if isinstance(data.get("reinit_lr_cfg"), Mapping) else None
        self.reinit_optim_cfg = data.get("reinit_optim_cfg") if isinstance(data.get("reinit_optim_cfg"), Mapping) else None
        for p in data.get("phases") or []:
            for e in p.get("edits") or []:
                self.store_edit(EditInfo.from_dict(e))
        self.mark(SCHEDULE, EDITS)

    def _on_transition(self, ev: Event) -> None:
        tr = TransitionInfo.from_dict(ev.data)
        if tr.step is None:
            tr.step = ev.step
        if tr.epoch is None:
            tr.epoch = ev.epoch
        self._add_transition(tr, ev.ts)

    def _add_transition(self, tr: TransitionInfo, ts: float | None) -> None:
        previous = self.transitions[-1] if self.transitions else None
        self.transitions.append(tr)
        self.phase = tr.to_phase
        for p in self.phases:
            p.state = "done" if p.index < tr.to_phase else "current" if p.index == tr.to_phase else p.state
        self.add_log("info", "transition", tr.describe(), ts, tr.step)
        old_sched = previous.scheduler if previous else None
        # the daemon says whether this transition built one; older recordings only show the spec changing
        sched_reinit = tr.scheduler_reinit if tr.scheduler_reinit is not None else tr.scheduler != old_sched
        if tr.scheduler and sched_reinit:
            pg = tr.scheduler.get("init_pg_lrs") if isinstance(tr.scheduler, Mapping) else None
            extra = f", init_pg_lrs [{', '.join(fmt_num(v) for v in pg)}]" if pg else ""
            self.add_log("info", "scheduler", f"scheduler reinitialized: {scheduler_summary(tr.scheduler)}{extra}", ts, tr.step)
        old_opt = previous.optimizer if previous else None
        optim_reinit = tr.optimizer_reinit if tr.optimizer_reinit is not None else tr.optimizer != old_opt
        if tr.optimizer and optim_reinit:
            init = tr.optimizer.get("optimizer_init", tr.optimizer)
            self.add_log("info", "scheduler", f"optimizer reinitialized: {short_class(init.get('class_path'))}({fmt_args(init.get('init_args'))})", ts, tr.step)
        self.mark(SCHEDULE, LR, METRICS)

    def _on_lr(self, ev: Event) -> None:
        lrs = ev.data.get("lrs") or {}
        x = float(ev.step if ev.step is not None else self.events_applied)
        series_by_tag = self.lr
        for tag, value in lrs.items():
            series = series_by_tag.get(tag)
            if series is None:
                series = self._new_lr_series(tag)
            if value is not None:
                series.append(x, float(value))
        if ev.step is not None and (not self._rate or ev.ts - self._rate[-1][0] >= 0.25):
            self._rate.append((ev.ts, ev.step))
        self._dirty.add(LR)

    def _new_lr_series(self, tag: str) -> Series:
        # LearningRateMonitor renames ``base`` to ``base/pg1`` once a second unnamed group appears: follow it.
        if tag.endswith("/pg1") and tag[:-4] in self.lr:
            self.lr[tag] = self.lr.pop(tag[:-4])
            return self.lr[tag]
        self.lr[tag] = Series(self.series_capacity)
        return self.lr[tag]

    def _on_metric(self, ev: Event) -> None:
        stage = str(ev.data.get("stage") or "")
        x = float(ev.step if ev.step is not None else self.events_applied)
        for name, value in (ev.data.get("metrics") or {}).items():
            self._metric(name, stage).append(x, math.nan if value is None else float(value))
        self.mark(METRICS)

    def _metric(self, name: str, stage: str) -> Series:
        series = self.metrics.get(name)
        if series is None:
            series = self.metrics[name] = Series(self.series_capacity)
            self.metric_stage[name] = stage or ("val" if name.startswith("val") else "train")
        return series

    def _on_edit(self, ev: Event) -> None:
        raw = ev.data.get("edit") or {}
        edit = EditInfo.from_dict(raw)
        if edit.id is not None:  # a refused queue_edit has no id: it is only logged
            self.store_edit(edit)
        level = "error" if edit.status == "rejected" else "info"
        self.add_log(level, "edit", edit.describe(), ev.ts, ev.step)

    def store_edit(self, edit: EditInfo) -> None:
        """Record an edit (from an event, a snapshot, or the daemon's reply to our own ``queue_edit``)."""
        old = self.edits.get(edit.id)
        if old is not None and old.status != "queued" and edit.status == "queued":
            return  # a stale "queued" copy (from a schedule event) never undoes a final status
        self.edits[edit.id] = edit
        self.mark(EDITS, SCHEDULE)

    def _on_log(self, ev: Event) -> None:
        level = str(ev.data.get("level", "info"))
        self.add_log(level if level in ("info", "warning", "error") else "info", "log", str(ev.data.get("message", "")), ev.ts, ev.step)

    # ------------------------------------------------------------------------------------------------ snapshot

    def apply_snapshot(self, snap: Mapping[str, Any]) -> None:
        """Replace everything with a daemon ``snapshot`` reply; events at or below its ``seq`` are then stale.

        The reply (see ``fts_daemon.bus``) carries the hello fields (``run``, ``daemon``, ``seq``, ``state``,
        ``phase``, ``step``, ``epoch`` and the daemon's static info), ``state_data``, ``schedule``, ``edits``,
        ``transitions``, ``logs``, ``lr`` (``{tag: [[step, lr], ...]}``) and ``metrics``
        (``{name: {"stage", "points": [[step, epoch, value], ...]}}``), histories already downsampled; or, with
        ``series: "packed"``, each series as columns (``steps``, ``values``: hex strings, or ``array('d')`` once unpacked).
        """
        snap = unpack_snapshot_series(snap)  # first: a malformed column raises ProtocolError before anything changes
        keep_plan = self.plan if snap.get("run") == self.run else None
        self.reset()
        self.plan = keep_plan
        self.run = snap.get("run")
        self.daemon = snap.get("daemon")
        self.last_seq = int(snap.get("seq") or 0)
        self.info = {k: v for k, v in snap.items() if k not in SNAPSHOT_KEYS}
        state_data = snap.get("state_data") or {}
        if isinstance(state_data.get("info"), Mapping):
            self.info.update(state_data["info"])
        self.status = str(snap.get("state") or state_data.get("state") or self.status)
        self.error = state_data.get("error")
        self.end_reason = None if state_data.get("reason") is None else str(state_data["reason"])
        self._take_run_rate(state_data)
        self.epoch, self.step = snap.get("epoch"), snap.get("step")
        if snap.get("schedule"):
            self.load_schedule(snap["schedule"])
        if isinstance(snap.get("phase"), int):
            self.phase = snap["phase"]
        for t in snap.get("transitions") or []:
            if t.get("from") is not None:  # the run's own start is not a transition worth a marker
                self._add_transition(TransitionInfo.from_dict(t), t.get("ts"))
        # the log: transitions (just added), edits, logs; ordered by time where the snapshot says it
        entries = list(self.log)
        for e in snap.get("edits") or []:
            edit = EditInfo.from_dict(e)
            if edit.id is not None:
                self.store_edit(edit)
            entries.append(LogEntry(edit.created, "error" if edit.status == "rejected" else "info", "edit", edit.describe()))
        for item in snap.get("logs") or []:
            entries.append(LogEntry(item.get("ts"), str(item.get("level", "info")), "log", str(item.get("message", ""))))
        if self.status in FINAL_STATES:
            text = f"run {self.status}" + (f": {self.error}" if self.error else "")
            entries.append(LogEntry(None, "error" if self.status == "failed" else "info", "state", text))
        entries.sort(key=lambda e: math.inf if e.ts is None and e.kind == "state" else (e.ts or 0.0))
        self.log.clear()
        self.log.extend(entries)
        self.log_total = len(self.log)
        if snap.get("series") == "packed":  # columns of floats (NaN where the list form has null)
            for tag, item in (snap.get("lr") or {}).items():
                self.lr.setdefault(tag, Series(self.series_capacity)).load(item["steps"], item["values"])
            for name, item in (snap.get("metrics") or {}).items():
                self._metric(name, str(item.get("stage") or "")).load(item["steps"], item["values"])
        else:
            for tag, points in (snap.get("lr") or {}).items():
                series = self.lr.setdefault(tag, Series(self.series_capacity))
                for point in points:
                    if point[0] is not None and point[1] is not None:
                        series.append(float(point[0]), float(point[1]))
            for name, item in (snap.get("metrics") or {}).items():
                series = self._metric(name, str(item.get("stage") or ""))
                for point in item.get("points") or []:
                    if point[0] is not None and point[-1] is not None:
                        series.append(float(point[0]), float(point[-1]))
        self.needs_resync, self.resync_reason = False, ""
        self.log_epoch += 1
        self.mark(*ALL_PARTS)

    def load_events(self, events: Iterable[Event | Mapping[str, Any]]) -> int:
        """Apply a recorded stream in order (replay); returns how many events were applied."""
        n = 0
        for ev in events:
            n += bool(self.apply(ev))
        return n

    def set_plan(self, result: PlanData | Mapping[str, Any] | None, error: str | None = None) -> None:
        """The plan: a ``plan`` op result, or one already made into :class:`PlanData`."""
        self.plan = PlanData.from_dict(result) if isinstance(result, Mapping) else result
        self.plan_error = error
        self.mark(PLAN, LR, SCHEDULE)

    def set_planning(self, planning: bool) -> None:
        if planning != self.planning:
            self.planning = planning
            self.mark(PLANNING)

    # ------------------------------------------------------------------------------------------------ derived

    @property
    def n_phases(self) -> int:
        return len(self.phases)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATES

    def phase_state(self, phase: PhaseInfo) -> str:
        """The phase's state as shown: the last phase of a run that ran to its end is done, not current."""
        if phase.state == "current" and self.status == "finished" and self.end_reason == "completed":
            return "done"
        return phase.state

    def steps_per_second(self) -> float | None:
        """The last 10 s of steps while the run goes on; once it has finished, its average (when the daemon says)."""
        if self.finished and self.run_rate is not None:
            return self.run_rate
        if len(self._rate) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        # a 10 s window of event time
        for t, s in self._rate:
            if t1 - t <= 10.0:
                t0, s0 = t, s
                break
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def pending_edits(self, phase: int | None = None) -> list[EditInfo]:
        return [e for e in self.edits.values() if e.pending and (phase is None or e.phase == phase)]

    def editable(self, phase: int) -> bool:
        """Only phases that have not started yet (and will run) take edits, and only while training goes on."""
        if self.finished or self.status == "stopping":
            return False
        for p in self.phases:
            if p.index == phase:
                return p.state == "pending" and phase > self.phase
        return False

    def phase_start_steps(self) -> list[tuple[int, float]]:
        """(phase, first step) for phases that have started after phase 0."""
        return [(t.to_phase, float(t.step)) for t in self.transitions if t.step is not None and t.from_phase is not None]

    def actual_start_epoch(self, phase: int) -> int | None:
        if phase == 0:
            return 0 if self.phases else None
        for t in self.transitions:
            if t.to_phase == phase:
                return t.epoch
        return None

    def planned_start_epoch(self, phase: int) -> tuple[int | None, bool]:
        """(epoch, exact): from the plan when there is one, else from the previous phase's ``max_transition_epoch``.

        ``exact`` is False when early stopping may move the start earlier (or, without a limit, decides it).
        """
        if phase == 0:
            return 0, True
        if self.plan is not None:
            epoch = self.plan.start_epoch(phase)
            if epoch is not None:
                return epoch, False
        for p in self.phases:
            if p.index == phase - 1:
                return (p.max_transition_epoch, False) if p.max_transition_epoch >= 0 else (None, False)
        return None, False

    def scheduler_in_force(self, phase: int) -> tuple[str, bool]:
        """(summary, reinit here): the LR scheduler that runs during ``phase``."""
        if phase > 0 and self.reinit_lr_cfg is not None:
            return scheduler_summary(self.reinit_lr_cfg), True
        for p in sorted((p for p in self.phases if p.index <= phase), key=lambda p: -p.index):
            if p.new_lr_scheduler and p.index > 0:
                return scheduler_summary(p.new_lr_scheduler), p.index == phase
        initial = self.info.get("scheduler")
        if isinstance(initial, Mapping):
            return scheduler_summary(initial) + " (initial)", phase == 0
        return "(module's own)", phase == 0

    def groups_for(self, phase: int) -> list[str]:
        if 0 <= phase < len(self.groups):
            return self.groups[phase]
        return []

    def phase_info(self, phase: int) -> PhaseInfo | None:
        for p in self.phases:
            if p.index == phase:
                return p
        return None

    def metric_names(self) -> list[str]:
        """Logged metrics, train first (the daemon sends no LR keys as metrics: LRs have their own events)."""
        return sorted(self.metrics, key=lambda n: (self.metric_stage.get(n) != "train", n))

    def phase_segments(self, series: Series) -> list[tuple[int, list[float], list[float]]]:
        """Split ``series`` at phase starts, each x shifted to steps since its phase began (the overlay view)."""
        bounds = [(0, 0.0)] + self.phase_start_steps()
        out = []
        for i, (phase, start) in enumerate(bounds):
            end = bounds[i + 1][1] if i + 1 < len(bounds) else math.inf
            xs, ys = series.slice_x(start, end)
            if xs:
                out.append((phase, [x - start for x in xs], ys))
        return out


def plan_args(state: RunState) -> dict[str, Any]:
    """``plan`` op arguments that pin phases already started to the epochs they really started at (early stopping
    cannot be planned), so the planned curve lines up with the actual one."""
    started = {str(t.to_phase): t.epoch for t in state.transitions if t.from_phase is not None and t.epoch is not None}
    return {"transition_epochs": started} if started else {}


def summarize_params(params: Sequence[str], width: int = 40) -> str:
    """``10: embeddings.LayerNorm.*, encoder.layer.{0..3}.*`` — a count and the common prefixes."""
    if not params:
        return "0"
    heads: list[str] = []
    for name in params:
        parts = name.split(".")
        head = ".".join(parts[:2]) if len(parts) > 2 else name
        if parts[0] in ("encoder", "decoder", "model", "layers", "blocks") and len(parts) > 3:
            head = ".".join(parts[:3])
        if head not in heads:
            heads.append(head)
    text = ", ".join(h + (".*" if h not in params else "") for h in heads)
    text = f"{len(params)}: {text}"
    return text if len(text) <= width else text[: width - 1] + "…"
