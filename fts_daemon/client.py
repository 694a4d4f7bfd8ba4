"""Client side of protocol v1: a blocking control client and a blocking Clone-pattern follower.

Torch-free. The rules for combining a snapshot with the live stream live in :mod:`fts_daemon.clone` (no sockets, no
ZeroMQ), so any client -- the blocking :class:`Follower` here, or the TUI's asyncio one -- shares them:

1. subscribe first, buffering events;
2. ask ``snapshot``; it is current to ``seq`` N of daemon D;
3. drop buffered and live events with ``seq`` <= N, apply ``seq`` == N+1, N+2, ...;
4. a ``seq`` gap or an event from another daemon id means events were lost (or the daemon restarted): snapshot again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from fts_daemon import events as ev
from fts_daemon.clone import CloneTracker

__all__ = ["CloneTracker", "Control", "ControlError", "CurveClientKeys", "Follower"]


class ControlError(RuntimeError):
    """An error reply (its one-line message) or no reply in time."""


@dataclass
class CurveClientKeys:
    """Keys for a daemon bound with CURVE: the server's public key and this client's key pair (Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class Control:
    """A DEALER connected to a daemon's ROUTER: ``request(op, **args)`` returns the result or raises ControlError.

    Replies are matched by ``id``, so a late reply to an earlier, timed-out request is skipped rather than taken as
    the answer to the current one.
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float = 5.0,
        context: zmq.Context | None = None,
        curve: CurveClientKeys | None = None,
    ):
        self.endpoint = endpoint
        self.timeout = timeout
        # one context per process, as the ZeroMQ guide advises: a context owns an I/O thread, so a client that
        # connects often (a TUI re-attaching, a script polling status) would start and join one per connection
        self.context = context or zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        req_id = next(self._ids)
        body = ev.request(op, req_id, **args)
        if len(body) > ev.MAX_REQUEST_BYTES:  # the daemon would drop it unread: say so instead of timing out
            raise ControlError(f"{op} request of {len(body)} bytes is over the protocol's {ev.MAX_REQUEST_BYTES}-byte "
                               "limit")
        self.sock.send(body)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise ControlError(f"no reply to {op!r} from {self.endpoint} within {self.timeout:g}s")
            got_id, ok, payload = ev.parse_reply(self.sock.recv())
            if got_id != req_id:
                continue
            if not ok:
                raise ControlError(str(payload))
            return payload

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Follower:
    """Blocking Clone-pattern subscriber: yields ``("snapshot", dict)`` then ``("event", Event)``, re-snapshotting
    by itself after a gap. Tests, the CLI and small scripts use it; GUIs use CloneTracker with their own loop."""

    def __init__(
        self,
        pub: str,
        ctl: str,
        topics: tuple[str, ...] = (ev.TOPIC_PREFIX,),
        curve: CurveClientKeys | None = None,
        rcvhwm: int = 100000,
        context: zmq.Context | None = None,
        series: str = "lists",
    ):
        self.context = context or zmq.Context.instance()  # shared: see Control
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        if curve is not None:
            curve.apply(self.sub)
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self.sub.connect(pub)
        self.control = Control(ctl, context=self.context, curve=curve)
        self.tracker = CloneTracker()
        self.snapshots = 0
        # how snapshots carry LR/metric histories: "lists" ([[step, lr], ...]) or "packed" (array('d') columns:
        # ``{"steps", "values"}`` per tag, plus ``"epochs"`` per metric; NaN where lists have null), ~10x cheaper
        # to decode for a client that attaches often
        self.series = series

    def _recv(self, timeout: float) -> ev.Event | None:
        if not self.sub.poll(int(timeout * 1000)):
            return None
        return ev.decode_event(self.sub.recv_multipart())

    def follow(self, timeout: float = 30.0, settle: float = 0.2) -> Iterator[tuple[str, Any]]:
        """Run until ``timeout`` seconds pass without any event. ``settle``: how long to wait for the first event
        before the first snapshot (the SUB connection is asynchronous; snapshotting before it is live only costs a
        second snapshot)."""
        first = self._recv(settle)
        if first is not None:
            self.tracker.on_event(first)
        while True:
            if self.tracker.seq is None:
                args = {"series": self.series} if self.series != "lists" else {}
                snapshot = ev.unpack_snapshot_series(self.control.request("snapshot", **args))
                self.snapshots += 1
                replay = self.tracker.on_snapshot(snapshot)
                yield "snapshot", snapshot
                for event in replay:
                    yield "event", event
                if self.tracker.seq is None:
                    continue
            event = self._recv(timeout)
            if event is None:
                return
            if self.tracker.on_event(event) == CloneTracker.APPLY:
                yield "event", event

    def close(self) -> None:
        self.sub.close(0)
        self.control.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
