"""The event bus: one I/O thread that owns every ZeroMQ socket of a daemon.

Threads and ownership:

* The training thread (and anything else) calls :meth:`EventBus.publish`, which only appends a tuple to an in-memory
  queue and returns; it never touches a socket, never encodes JSON and never waits. High-rate kinds (``lr``,
  ``metric``) are dropped when too many are pending (counted; the ``seq`` gap tells subscribers); the rare ones
  (state, schedule, transition, edit, log) are always kept, so a subscriber can always re-synchronize.
* The I/O thread assigns ``seq``, encodes, sends on the PUB socket (non-blocking: ZeroMQ drops at the high-water mark
  for slow subscribers), appends to ``events.jsonl``, folds each event into :class:`RunHistory` (what a snapshot
  returns), answers ROUTER control requests, and sends a heartbeat when nothing else was sent for a while.

This is the ZeroMQ guide's *Clone* pattern: a client subscribes, asks ``snapshot`` (the state as of ``seq`` N), then
applies only events with ``seq`` > N; a gap or a new ``daemon`` id means "snapshot again".
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from fts_daemon import events as ev

log = logging.getLogger("fts_daemon.bus")

# Kinds that may be dropped under pressure (one per step); everything else is rare and must arrive.
LOSSY_KINDS = frozenset({ev.LR, ev.METRIC})
# Control requests answered per loop turn before publishing resumes (a request flood cannot starve the stream).
MAX_REQUESTS_PER_TURN = 64
# Events published per loop turn before control requests are looked at again.
MAX_EVENTS_PER_TURN = 4096

Handler = Callable[[dict[str, Any]], Any]
Watcher = Callable[[ev.Event], None]


class OpError(ValueError):
    """A control request that cannot be done; the message becomes the one-line error reply."""


class BindRefused(ValueError):
    """An endpoint the daemon will not bind (non-loopback without CURVE, or an unknown transport)."""


@dataclass
class CurveKeys:
    """CURVE material for a non-loopback bind: the server key pair and the directory of allowed client keys."""

    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def from_dir(cls, curve_dir: str | os.PathLike[str]) -> CurveKeys:
        """``curve_dir/server.key_secret`` (as written by ``zmq.auth.create_certificates``) and
        ``curve_dir/authorized_clients/*.key`` (client public keys)."""
        import zmq.auth

        base = Path(curve_dir)
        secret_file = base / "server.key_secret"
        authorized = base / "authorized_clients"
        if not secret_file.is_file():
            raise BindRefused(f"CURVE: {secret_file} not found (create it with zmq.auth.create_certificates)")
        if not authorized.is_dir():
            raise BindRefused(f"CURVE: {authorized} (public keys of allowed clients) not found")
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise BindRefused(f"CURVE: {secret_file} holds no secret key")
        return cls(public=public, secret=secret, authorized_dir=authorized)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and ``tcp://`` on a loopback address."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a DNS name: not provably loopback
        return False


def check_endpoint(endpoint: str, curve: CurveKeys | None) -> str:
    """Normalize a bind endpoint and refuse what the security policy forbids (one-line reason)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep or transport not in ("ipc", "tcp", "inproc"):
        raise BindRefused(f"refusing endpoint {endpoint!r}: only ipc://, tcp:// and inproc:// are supported")
    if transport == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port:
            raise BindRefused(f"refusing endpoint {endpoint!r}: tcp endpoints need host:port")
        if port == "0":  # "any free port" is spelled '*' in ZeroMQ
            endpoint = f"tcp://{host}:*"
    if not is_loopback_endpoint(endpoint) and curve is None:
        raise BindRefused(
            f"refusing to bind {endpoint} without CURVE: a non-loopback address exposes the control socket "
            "(which changes training) to the network; pass --curve-dir or bind 127.0.0.1 / ipc://"
        )
    return endpoint


def _encode(event: ev.Event) -> list[bytes]:
    """``events.encode_event``, byte for byte, without its NaN-scrubbing walk when there is nothing to scrub.

    The walk costs about as much as the encoding itself and almost every event is finite; ``allow_nan=False``
    makes the plain encoder refuse exactly the events that need it.
    """
    try:
        body = json.dumps(event.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        return ev.encode_event(event)
    return [event.topic.encode("ascii"), body]


# --------------------------------------------------------------------------------------------------- history


class Downsampler:
    """A bounded series: keeps every ``stride``-th point and doubles the stride when full (plus the latest point)."""

    def __init__(self, max_points: int):
        self.max_points = max(2, int(max_points))
        self.stride = 1
        self.count = 0
        self.points: list[Any] = []
        self.last: Any = None

    def add(self, point: Any) -> None:
        if self.count % self.stride == 0:
            self.points.append(point)
            if len(self.points) > self.max_points:
                self.points = self.points[::2]
                self.stride *= 2
        self.count += 1
        self.last = point

    def values(self) -> list[Any]:
        out = list(self.points)
        if self.last is not None and (not out or out[-1] is not self.last):
            out.append(self.last)
        return out


class RunHistory:
    """Everything a late subscriber needs, folded from the event stream (owned by the I/O thread)."""

    def __init__(self, max_points: int = 1000, recent: int = 200):
        self.max_points = max_points
        self.state: dict[str, Any] = {"state": "starting", "error": None}
        self.schedule: dict[str, Any] | None = None
        self.edits: dict[str, dict[str, Any]] = {}
        self.transitions: list[dict[str, Any]] = []
        self.logs: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.lr: dict[str, Downsampler] = {}
        self.metrics: dict[str, Downsampler] = {}
        self.metric_stage: dict[str, str] = {}
        self.phase = 0
        self.step: int | None = None
        self.epoch: int | None = None

    def ingest(self, event: ev.Event) -> None:
        if event.step is not None:
            self.step = event.step
        if event.epoch is not None:
            self.epoch = event.epoch
        data = event.data
        if event.kind == ev.STATE:
            self.state = dict(data)
        elif event.kind == ev.SCHEDULE:
            self.schedule = data
            self.phase = int(data.get("depth", self.phase))
        elif event.kind == ev.TRANSITION:
            self.transitions.append(data)
            self.phase = int(data.get("to", self.phase))
        elif event.kind == ev.LR:
            for tag, value in data.get("lrs", {}).items():
                series = self.lr.get(tag)
                if series is None:
                    series = self.lr[tag] = Downsampler(self.max_points)
                series.add((event.step, value))  # tuples of scalars: not tracked by the GC
        elif event.kind == ev.METRIC:
            stage = data.get("stage", "train")
            for name, value in data.get("metrics", {}).items():
                series = self.metrics.get(name)
                if series is None:
                    series = self.metrics[name] = Downsampler(self.max_points)
                    self.metric_stage[name] = stage
                series.add((event.step, event.epoch, value))
        elif event.kind == ev.EDIT:
            edit = data.get("edit", {})
            if "id" in edit:
                self.edits[str(edit["id"])] = edit
        elif event.kind == ev.LOG:
            self.logs.append({"seq": event.seq, "ts": event.ts, **data})

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.get("state"),
            "state_data": dict(self.state),
            "phase": self.phase,
            "step": self.step,
            "epoch": self.epoch,
            "schedule": self.schedule,
            "edits": list(self.edits.values()),
            "transitions": list(self.transitions),
            "logs": list(self.logs),
            "lr": {tag: s.values() for tag, s in self.lr.items()},
            "metrics": {
                name: {"stage": self.metric_stage.get(name, "train"), "points": s.values()}
                for name, s in self.metrics.items()
            },
        }


# --------------------------------------------------------------------------------------------------- bus


@dataclass
class BusConfig:
    run: str
    pub: str  # bind endpoints; tcp port 0 means "any free port"
    ctl: str
    events_path: Path | None = None
    daemon: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    queue_limit: int = 65536  # pending lossy events before they are dropped
    sndhwm: int = 20000  # per-subscriber messages ZeroMQ buffers before dropping for that subscriber
    heartbeat_s: float = 1.0
    # how long the I/O thread sleeps between batches when no request arrives: bounds event latency; longer means
    # fewer wake-ups stealing a core from training (and subscribers wake once per batch, not once per event)
    poll_ms: int = 100
    history_points: int = 1000  # per LR tag / metric name in snapshots
    recent: int = 200  # log events kept for snapshots
    curve: CurveKeys | None = None
    info: dict[str, Any] = field(default_factory=dict)  # static extras for hello/snapshot (pid, run_dir, ...)


class EventBus:
    """Publish events and answer control requests; see the module docstring for the threading rules."""

    def __init__(self, config: BusConfig):
        self.config = config
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any], int | None, int | None, float]] = queue.SimpleQueue()
        self._handlers: dict[str, Handler] = {}
        self._params: dict[str, frozenset[str]] = {"hello": frozenset(), "snapshot": frozenset()}
        self._watchers: list[Watcher] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._start_error: BaseException | None = None
        self.history = RunHistory(config.history_points, config.recent)
        self.endpoints: tuple[str, str] | None = None
        self.seq = 0
        self.dropped = 0  # lossy events refused because the queue was full (training-thread side)
        self._dropped_seen = 0
        self.published = 0
        self._last_send = time.monotonic()
        self._jsonl: TextIO | None = None
        self._unflushed = False

    # ------------------------------------------------------------------------------------------- any thread

    def publish(self, kind: str, data: dict[str, Any], step: int | None = None, epoch: int | None = None) -> bool:
        """Queue an event without blocking; False if it was dropped. ``data`` must not be mutated afterwards."""
        if kind in LOSSY_KINDS and self._queue.qsize() >= self.config.queue_limit:
            self.dropped += 1
            return False
        self._queue.put((kind, data, step, epoch, time.time()))
        return True

    def register(self, op: str, handler: Handler, params: tuple[str, ...] = ()) -> None:
        """Answer ``op`` with ``handler(args)`` (run on the I/O thread; raise OpError for an error reply).

        ``params``: the argument names ``op`` takes; any other argument is refused before the handler runs, so a
        typo never silently does something else.
        """
        self._handlers[op] = handler
        self._params[op] = frozenset(params)

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher(event)`` on the I/O thread after each event is sent (keep it quick)."""
        self._watchers.append(watcher)

    @property
    def daemon(self) -> str:
        return self.config.daemon

    def start(self, timeout: float = 10.0) -> tuple[str, str]:
        """Bind the sockets on the I/O thread; return the bound (pub, ctl) endpoints or raise why not."""
        self.config.pub = check_endpoint(self.config.pub, self.config.curve)
        self.config.ctl = check_endpoint(self.config.ctl, self.config.curve)
        self._thread = threading.Thread(target=self._main, name=f"fts-bus-{self.config.run}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("event bus did not start in time")
        if self._start_error is not None:
            raise self._start_error
        assert self.endpoints is not None
        return self.endpoints

    def close(self, timeout: float = 10.0) -> None:
        """Send everything still queued, then close the sockets and the events file."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------- I/O thread

    def _main(self) -> None:
        ctx = zmq.Context()
        auth = None
        pub = ctl = None
        try:
            pub = ctx.socket(zmq.PUB)
            ctl = ctx.socket(zmq.ROUTER)
            pub.setsockopt(zmq.SNDHWM, self.config.sndhwm)
            pub.setsockopt(zmq.LINGER, 1000)
            ctl.setsockopt(zmq.LINGER, 0)
            # replies to a vanished client raise instead of being silently queued forever
            ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # ZeroMQ itself drops peers that send frames beyond the protocol limit: they are never read into memory
            ctl.setsockopt(zmq.MAXMSGSIZE, ev.MAX_REQUEST_BYTES + 1024)
            for sock in (pub, ctl):
                # notice dead tcp peers (ignored for ipc)
                sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
            if self.config.curve is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(self.config.curve.authorized_dir))
                for sock in (pub, ctl):
                    sock.curve_server = True
                    sock.curve_publickey = self.config.curve.public
                    sock.curve_secretkey = self.config.curve.secret
            pub.bind(self.config.pub)
            ctl.bind(self.config.ctl)
            self.endpoints = (
                pub.getsockopt_string(zmq.LAST_ENDPOINT),
                ctl.getsockopt_string(zmq.LAST_ENDPOINT),
            )
            if self.config.events_path is not None:
                self.config.events_path.parent.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(self.config.events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        except Exception as err:  # reported to start()'s caller
            self._start_error = err if isinstance(err, (BindRefused, OSError)) else RuntimeError(
                f"cannot bind {self.config.pub} / {self.config.ctl}: {err}"
            )
            for sock in (pub, ctl):
                if sock is not None:
                    sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(pub, ctl)
        finally:
            if self._jsonl is not None:
                self._jsonl.flush()
                os.fsync(self._jsonl.fileno())
                self._jsonl.close()
            pub.close()
            ctl.close()
            if auth is not None:
                auth.stop()
            ctx.term()
            self._unlink_ipc()

    def _unlink_ipc(self) -> None:
        for endpoint in self.endpoints or ():
            if endpoint.startswith("ipc://"):
                try:
                    os.unlink(endpoint[len("ipc://") :])
                except OSError:
                    pass

    def _loop(self, pub: zmq.Socket, ctl: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(ctl, zmq.POLLIN)
        self._pub = pub
        while True:
            try:
                ready = dict(poller.poll(self.config.poll_ms))
                if ctl in ready:
                    self._serve(ctl)
                self._drain()
                if time.monotonic() - self._last_send >= self.config.heartbeat_s:
                    self._emit(ev.HEARTBEAT, {"state": self.history.state.get("state"), "phase": self.history.phase})
                if self._unflushed and self._jsonl is not None:
                    # one flush per loop turn: readers of events.jsonl (tail -f, tests) see events within ~poll_ms
                    self._jsonl.flush()
                    self._unflushed = False
                if self._closing.is_set() and self._queue.empty():
                    return
            except Exception:  # the bus must outlive any single bad event or request
                log.exception("fts event bus: unexpected error (continuing)")

    def _drain(self) -> int:
        sent = 0
        while sent < MAX_EVENTS_PER_TURN:
            try:
                kind, data, step, epoch, ts = self._queue.get_nowait()
            except queue.Empty:
                break
            self._account_drops()
            self._emit(kind, data, step, epoch, ts)
            sent += 1
        return sent

    def _account_drops(self) -> None:
        dropped = self.dropped
        if dropped > self._dropped_seen:
            lost = dropped - self._dropped_seen
            self._dropped_seen = dropped
            # skip the numbers the lost events would have had: subscribers see a gap and re-snapshot
            self.seq += lost
            self._emit(ev.LOG, {"level": "warning", "message": f"{lost} lr/metric events dropped: event queue full"})

    def _emit(
        self,
        kind: str,
        data: dict[str, Any],
        step: int | None = None,
        epoch: int | None = None,
        ts: float | None = None,
    ) -> None:
        self.seq += 1
        event = ev.Event(
            kind=kind,
            seq=self.seq,
            ts=time.time() if ts is None else ts,
            run=self.config.run,
            daemon=self.config.daemon,
            data=data,
            step=step,
            epoch=epoch,
        )
        try:
            frames = _encode(event)
        except (TypeError, ValueError) as err:  # a payload that is not JSON: say so instead of losing it silently
            event.kind, event.data = ev.LOG, {"level": "error", "message": f"unencodable {kind} event: {err}"}
            frames = ev.encode_event(event)
        if len(frames[1]) > ev.MAX_EVENT_BYTES:
            event.kind, event.data = ev.LOG, {"level": "error", "message": f"{kind} event too large to send"}
            frames = ev.encode_event(event)
        self.history.ingest(event)
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # PUB never blocks in practice; if it would, the subscriber sees a gap
            pass
        if self._jsonl is not None:
            self._jsonl.write(frames[1].decode("utf-8"))
            self._jsonl.write("\n")
            self._unflushed = True
        self.published += 1
        self._last_send = time.monotonic()
        for watcher in list(self._watchers):
            try:
                watcher(event)
            except Exception:
                log.exception("fts event bus: watcher failed")

    # ------------------------------------------------------------------------------------------- control

    def _serve(self, ctl: zmq.Socket) -> None:
        for _ in range(MAX_REQUESTS_PER_TURN):
            try:
                frames = ctl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2:  # DEALER: [identity, body]
                envelope, body = frames[:1], frames[1]
            elif len(frames) == 3 and frames[1] == b"":  # REQ: [identity, "", body]
                envelope, body = frames[:2], frames[2]
            else:
                self._reply(ctl, frames[:1], ev.error_reply(None, "expected exactly one JSON frame per request"))
                continue
            self._reply(ctl, envelope, self._answer(body))

    def _reply(self, ctl: zmq.Socket, envelope: list[bytes], body: bytes) -> None:
        try:
            ctl.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # client gone (ROUTER_MANDATORY) or its queue is full: drop the reply
            pass

    def _answer(self, body: bytes) -> bytes:
        req_id: Any = None
        try:
            req_id, op, args = ev.parse_request(body)
            return ev.ok_reply(req_id, self._dispatch(op, args))
        except (ev.ProtocolError, OpError) as err:
            return ev.error_reply(req_id, str(err))
        except (ValueError, TypeError, KeyError) as err:
            return ev.error_reply(req_id, f"bad request: {err}")
        except Exception as err:
            log.exception("fts event bus: control handler failed")
            return ev.error_reply(req_id, f"internal error: {type(err).__name__}: {err}")

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        params = self._params.get(op)
        if params is None:
            raise OpError(f"op {op!r} is not available in this daemon")
        unknown = sorted(set(args) - params - {"client"})  # "client": an optional free-form client name
        if unknown:
            takes = ", ".join(sorted(params)) or "no arguments"
            raise OpError(f"{op} takes {takes}; unknown argument {unknown[0]!r}")
        if op == "hello":
            return self.hello()
        if op == "snapshot":
            return {**self.hello(), **self.history.snapshot(), "stats": self.stats()}
        handler = self._handlers.get(op)
        if handler is None:
            raise OpError(f"op {op!r} is not available in this daemon")
        return handler(args)

    def hello(self) -> dict[str, Any]:
        pub, ctl = self.endpoints or (self.config.pub, self.config.ctl)
        return {
            **self.config.info,
            "protocol": ev.PROTOCOL_VERSION,
            "codec": "json",
            "run": self.config.run,
            "daemon": self.config.daemon,
            "seq": self.seq,
            "state": self.history.state.get("state"),
            "phase": self.history.phase,
            "step": self.history.step,
            "epoch": self.history.epoch,
            "pub": pub,
            "ctl": ctl,
            "ops": [op for op in ev.OPS if op in ("hello", "snapshot") or op in self._handlers],
        }

    def stats(self) -> dict[str, int]:
        return {"published": self.published, "dropped": self.dropped}
