"""Where the app's run state comes from: a live daemon (:mod:`fts_tui.client`) or a recording (replay).

The app only knows this interface: a :class:`~fts_tui.state.RunState` that the source keeps filled, an async
``run()`` it starts in a worker, ``request()`` for control ops (edits, plans), and ``on_update``, which the app sets
and the source calls once it has applied a burst of events (so the burst is drawn at once). Tests plug in their own.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from fts_daemon.events import Event
from fts_tui.replay import ReplayReport, events_path, iter_events, read_run_meta
from fts_tui.state import RunState

# Scheduler classes offered by the edit form when the daemon does not list its own (FTS's allowlist, minus the
# lambda-based ones whose arguments cannot be written in YAML).
DEFAULT_SCHEDULERS = (
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
    "torch.optim.lr_scheduler.ConstantLR",
    "torch.optim.lr_scheduler.LinearLR",
    "torch.optim.lr_scheduler.ReduceLROnPlateau",
)


# how long a `plan` request may take: the daemon simulates the whole run (seconds for a million steps) on a thread of
# its own, one request at a time, so waiting beats asking again
PLAN_TIMEOUT_S = 120.0


class RequestError(Exception):
    """A control request that failed: the daemon's one-line reason, a timeout, or a read-only source."""


class Source(Protocol):
    state: RunState
    label: str  # where the data comes from, for the header
    read_only: bool
    # set by the app; called (on the app's event loop) after a burst of events has been applied
    on_update: Callable[[], None] | None
    # set by the app: the time between its frames while its CPU budget spaces them out (else None); a live source
    # reads its socket as seldom, so that it wakes once a frame rather than once a daemon batch
    pace: Callable[[], float | None] | None

    async def run(self) -> None:
        """Keep ``state`` up to date until cancelled."""

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send a control op; return its result or raise :class:`RequestError`."""

    def schedulers(self) -> list[str]:
        """Scheduler classes an edit may name."""


class ReplaySource:
    """A finished or crashed run read from its ``events.jsonl``; read-only."""

    read_only = True

    def __init__(self, target: str | Path, state: RunState | None = None) -> None:
        self.target = Path(target)
        self.state = state or RunState(tolerant=True)
        self.report: ReplayReport | None = None
        self.label = str(self.target)
        self.on_update: Callable[[], None] | None = None
        self.pace: Callable[[], float | None] | None = None  # unused: nothing arrives by itself

    def load(self) -> ReplayReport:
        if self.report is None:
            # hundreds of thousands of short-lived dicts and events: the cyclic GC would rescan them again and again
            # (about a third of the load time of a 100k-step run) while none of them can form a cycle
            paused = gc.isenabled()
            gc.disable()
            try:
                path = events_path(self.target)
                self.report = ReplayReport(path=path)
                self.state.load_events(iter_events(path, self.report))
            finally:
                if paused:
                    gc.enable()
            meta = read_run_meta(self.target)
            if isinstance(meta.get("info"), dict):
                self.state.info = {**meta["info"], **self.state.info}
            self.state.set_connection("replay", self.report.describe().split(" from ")[0])
            if self.report.torn_tail or self.report.bad_lines:
                self.state.add_log("warning", "connection", self.report.describe())
        return self.report

    async def run(self) -> None:
        self.load()
        if self.on_update is not None:
            self.on_update()

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        raise RequestError("a replay is read-only")

    def schedulers(self) -> list[str]:
        return list(DEFAULT_SCHEDULERS)


Handler = Callable[[str, dict[str, Any]], Any]


class MemorySource:
    """A source fed by code: ``feed`` applies events, a ``handler(op, args)`` answers requests (tests, bench, demos).

    The handler returns the result (or an awaitable of it) or raises :class:`RequestError` with the reason.
    """

    def __init__(self, state: RunState | None = None, handler: Handler | None = None, label: str = "memory") -> None:
        self.state = state or RunState()
        self.handler = handler
        self.label = label
        self.read_only = handler is None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.on_update: Callable[[], None] | None = None
        self.pace: Callable[[], float | None] | None = None  # unused: nothing arrives by itself
        self.state.set_connection("live")

    def feed(self, events: Iterable[Event | dict[str, Any]]) -> None:
        for event in events:
            self.state.apply(event)
        if self.on_update is not None:
            self.on_update()

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing arrives by itself; tests call feed()

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        self.requests.append((op, args))
        if self.handler is None:
            raise RequestError("a replay is read-only")
        result = self.handler(op, args)
        return await result if inspect.isawaitable(result) else result

    def schedulers(self) -> list[str]:
        return list(DEFAULT_SCHEDULERS)
