"""The Clone pattern's sequence rules, shared by every client: no I/O, no ZeroMQ, no torch.

A client subscribes, asks ``snapshot`` (the state as of ``seq`` N of daemon D), then applies only events with
``seq`` N+1, N+2, ... of D:

* ``seq`` at or below the last one applied: a duplicate (the SUB socket held it while the snapshot was on its way);
  skip it;
* ``seq`` exactly one above: apply it;
* a ``seq`` gap (events were lost), another ``daemon`` id (the daemon restarted) or another ``run``: snapshot again.

:func:`verdict` is the rule for one event; :class:`CloneTracker` adds the buffering a blocking client needs before
its first snapshot (``fts_daemon.client.Follower``). The TUI's state model (``fts_tui.state``) calls
:func:`verdict` directly: its events wait unread in the SUB socket instead of a buffer.
"""

from __future__ import annotations

from typing import Any, Protocol

APPLY, SKIP, BUFFER, RESNAPSHOT = "apply", "skip", "buffer", "resnapshot"


class Stamped(Protocol):
    """What the rules read from an event (``fts_daemon.events.Event`` has it)."""

    seq: int
    daemon: str
    run: str


def verdict(event: Stamped, seq: int, daemon: str | None, run: str | None = None) -> tuple[str, str]:
    """(``APPLY`` / ``SKIP`` / ``RESNAPSHOT``, reason) for ``event``, given the last ``seq`` applied from ``daemon``
    (of ``run``; None: not checked). The reason is "" unless a new snapshot is needed."""
    if run is not None and event.run != run:
        return RESNAPSHOT, f"run changed ({event.daemon})"
    if event.daemon != daemon:
        return RESNAPSHOT, f"daemon restarted ({event.daemon})"
    if event.seq <= seq:
        return SKIP, ""
    if event.seq != seq + 1:
        return RESNAPSHOT, f"missed events {seq + 1}..{event.seq - 1}"
    return APPLY, ""


class CloneTracker:
    """Decides, per received event, whether to apply it, skip it, buffer it, or re-snapshot."""

    APPLY, SKIP, BUFFER, RESNAPSHOT = APPLY, SKIP, BUFFER, RESNAPSHOT

    def __init__(self) -> None:
        self.seq: int | None = None  # None: no snapshot yet (or a resync is due): events are buffered
        self.daemon: str | None = None
        self.run: str | None = None
        self.buffer: list[Any] = []
        self.gaps = 0
        self.reason = ""  # why the last re-snapshot was asked for

    def on_event(self, event: Stamped) -> str:
        if self.seq is None:
            self.buffer.append(event)
            return BUFFER
        action, reason = verdict(event, self.seq, self.daemon, self.run)
        if action == RESNAPSHOT:
            self.gaps += 1
            self.reason = reason
            self.seq = None
            self.buffer = []
        elif action == APPLY:
            self.seq = event.seq
        return action

    def on_snapshot(self, snapshot: dict[str, Any]) -> list[Any]:
        """Take a snapshot; return the buffered events to apply after it (a gap among them re-arms: ``seq`` None)."""
        self.seq, self.daemon = int(snapshot["seq"]), str(snapshot["daemon"])
        self.run = str(snapshot["run"]) if snapshot.get("run") is not None else None
        pending, self.buffer = self.buffer, []
        out = []
        for event in pending:
            action = self.on_event(event)
            if action == APPLY:
                out.append(event)
            elif action == RESNAPSHOT:
                return []
        return out
