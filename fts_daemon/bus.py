"""The event bus: one I/O thread that owns every ZeroMQ socket of a daemon.

Threads and ownership:

* The training thread (and anything else) calls :meth:`EventBus.publish`, which only appends a tuple to an in-memory
  queue and returns; it never touches a socket, never encodes JSON and never waits. High-rate kinds (``lr``,
  ``metric``) are dropped when too many are pending (counted; the ``seq`` gap tells subscribers); the rare ones
  (state, schedule, transition, edit, log) are always kept, so a subscriber can always re-synchronize.
* The I/O thread assigns ``seq``, encodes, sends on the PUB socket (non-blocking: ZeroMQ drops at the high-water mark
  for slow subscribers), appends to ``events.jsonl``, folds each event into :class:`RunHistory` (what a snapshot
  returns), answers ROUTER control requests, and sends a heartbeat when nothing else was sent for a while.
* Ops registered as ``slow`` (the planner's ``plan``: a whole run simulated step by step) run on a worker thread of
  their own, one at a time, so that the stream, the heartbeat and every other request go on meanwhile; the worker
  hands its reply back to the I/O thread, which alone sends on the sockets.
* Wake-ups: the I/O thread sleeps in ``poll`` on the control socket and a pipe. After each batch it lets
  ``batch_ms`` pass before the next (so it, and every subscriber, wakes at most 1000/batch_ms times a second); if
  nothing is queued then, it raises a flag and sleeps until a heartbeat is due. ``publish`` writes one byte to the
  pipe only when it sees the flag: the first event after a quiet spell reaches subscribers at once, while a steady
  stream costs the training thread no system call at all (at most one per ``batch_ms``).

This is the ZeroMQ guide's *Clone* pattern: a client subscribes, asks ``snapshot`` (the state as of ``seq`` N), then
applies only events with ``seq`` > N; a gap or a new ``daemon`` id means "snapshot again".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
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
from fts_daemon import gilsend
from fts_daemon.history import Downsampler, RunHistory

__all__ = [
    "BindRefused", "BusConfig", "CurveKeys", "Downsampler", "EventBus", "OpError", "RunHistory", "check_endpoint",
    "is_loopback_endpoint",
]

log = logging.getLogger("fts_daemon.bus")

# Kinds that may be dropped under pressure (one per step); everything else is rare and must arrive.
LOSSY_KINDS = frozenset({ev.LR, ev.METRIC})
# the queue's kind for an lr event from publish_lr: (tags, values) rather than its data
LR_ROW = "lr row"
# written through to the kernel at once (a killed daemon's record keeps them); the rest is flushed every FLUSH_S
DURABLE_KINDS = frozenset({ev.STATE, ev.SCHEDULE, ev.TRANSITION, ev.EDIT})
# Control requests answered per loop turn before publishing resumes (a request flood cannot starve the stream).
MAX_REQUESTS_PER_TURN = 64
# Events published per loop turn before control requests are looked at again.
MAX_EVENTS_PER_TURN = 4096
# How often buffered lines of events.jsonl are flushed to the file (and on close).
FLUSH_S = 0.1
# Slow requests waiting for the worker (beyond the one it is answering) before more are refused as busy.
MAX_SLOW_PENDING = 4

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


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


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
    # the shortest time between two batches of events: an event published while the I/O thread sleeps wakes it at
    # once, but after a batch it waits this long before the next, so a run whose events come faster than that wakes
    # it (and every subscriber) at most 1000/batch_ms times a second however many events there are. Each batch costs
    # wake-ups of three threads (this one, ZeroMQ's, a subscriber's) and GIL hand-offs with the training thread. At
    # ~2 ms steps with a live subscriber, 100 ms instead of 25 took the stream's cost from ~4% of the step time to
    # ~2% (bench/daemon_bench.py 1b), for up to ~100 ms more between an event and a display. Runs slower
    # than one event per batch_ms are not delayed at all
    batch_ms: float = 100.0
    # the longest the I/O thread sleeps with nothing to do (it also wakes for requests, events, heartbeats, close)
    poll_ms: int = 100
    history_points: int = 1000  # per LR tag / metric name in snapshots
    recent: int = 200  # log events kept for snapshots
    curve: CurveKeys | None = None
    info: dict[str, Any] = field(default_factory=dict)  # static extras for hello/snapshot (pid, run_dir, ...)
    # events.jsonl of earlier starts of this run, folded into the history before anything new (``--resume``)
    history_from: Path | None = None
    # called once, on the I/O thread, with a one-line reason when events.jsonl cannot be written (disk full, quota,
    # file size limit); the stream goes on without the file
    on_write_error: Callable[[str], Any] | None = None


class EventBus:
    """Publish events and answer control requests; see the module docstring for the threading rules."""

    def __init__(self, config: BusConfig):
        self.config = config
        # (kind, data, step, epoch, ts); data is (tags, values) for LR_ROW
        self._queue: queue.SimpleQueue[tuple[str, Any, int | None, int | None, float]] = queue.SimpleQueue()
        self._handlers: dict[str, Handler] = {}
        self._params: dict[str, frozenset[str]] = {"hello": frozenset(), "snapshot": frozenset({"series"})}
        self._watchers: list[tuple[Watcher, frozenset[str] | None]] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._start_error: BaseException | None = None
        self.history = RunHistory(config.history_points, config.recent)
        self._encoder = ev.StepEncoder(config.run, config.daemon)
        self.endpoints: tuple[str, str] | None = None
        self.seq = 0
        self.dropped = 0  # lossy events refused because the queue was full (training-thread side)
        self._dropped_seen = 0
        self.published = 0
        self.io_cpu_s = 0.0  # CPU time the I/O thread used, set when it ends (benchmarks read it)
        self._last_send = time.monotonic()
        self._jsonl: TextIO | None = None
        self._unflushed = False
        self._last_flush = 0.0
        # wake-up pipe: a publisher writes one byte only when the I/O thread said it is going to sleep (``_asleep``)
        self._asleep = False
        self._wake_lock = threading.Lock()
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        # slow ops: requests for the worker thread, and its replies for the I/O thread to send
        self._slow: set[str] = set()
        self._slow_jobs: queue.SimpleQueue[tuple[list[bytes], Any, Handler, dict[str, Any]] | None] = queue.SimpleQueue()
        self._slow_pending = 0  # jobs handed to the worker and not yet answered (I/O thread only)
        self._slow_replies: queue.SimpleQueue[tuple[list[bytes], bytes]] = queue.SimpleQueue()
        self._slow_thread: threading.Thread | None = None
        self._burst: list[tuple[bytes, bytes]] | None = None  # frames of the batch being drained (I/O thread)

    # ------------------------------------------------------------------------------------------- any thread

    def publish(self, kind: str, data: dict[str, Any], step: int | None = None, epoch: int | None = None) -> bool:
        """Queue an event without blocking; False if it was dropped. ``data`` must not be mutated afterwards."""
        if kind in LOSSY_KINDS and self._queue.qsize() >= self.config.queue_limit:
            self.dropped += 1
            return False
        self._queue.put((kind, data, step, epoch, time.time()))
        if self._asleep:  # rare: the first event after a quiet spell (a busy run finds the I/O thread awake)
            self._wake()
        return True

    def publish_lr(self, tags: tuple[str, ...], values: list[float], step: int | None = None,
                   epoch: int | None = None) -> bool:
        """Queue an ``lr`` event given as its tags and values (``lrs`` is ``dict(zip(tags, values))``): the tap's
        once-a-step call, which builds no dict. ``tags`` should be the same tuple object from step to step while the
        groups stay the same (the I/O thread caches by identity); neither may be mutated afterwards."""
        if self._queue.qsize() >= self.config.queue_limit:
            self.dropped += 1
            return False
        self._queue.put((LR_ROW, (tags, values), step, epoch, time.time()))
        if self._asleep:
            self._wake()
        return True

    def _wake(self) -> None:
        with self._wake_lock:  # the I/O thread closes the pipe under this lock: never write to a reused fd
            self._asleep = False
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:  # the pipe is full: the I/O thread has wake-ups pending anyway
                    pass

    def register(self, op: str, handler: Handler, params: tuple[str, ...] = (), *, slow: bool = False) -> None:
        """Answer ``op`` with ``handler(args)`` (run on the I/O thread; raise OpError for an error reply).

        ``params``: the argument names ``op`` takes; any other argument is refused before the handler runs, so a
        typo never silently does something else. ``slow``: the handler may take seconds; it runs on the bus's
        worker thread instead, one request at a time (see the module docstring).
        """
        self._handlers[op] = handler
        self._params[op] = frozenset(params)
        if slow:
            self._slow.add(op)
        else:
            self._slow.discard(op)

    def watch(self, watcher: Watcher, kinds: tuple[str, ...] | None = None) -> None:
        """Call ``watcher(event)`` on the I/O thread after each event of ``kinds`` (None: every kind) is sent (keep
        it quick)."""
        self._watchers.append((watcher, frozenset(kinds) if kinds is not None else None))

    @property
    def daemon(self) -> str:
        return self.config.daemon

    def start(self, timeout: float = 10.0) -> tuple[str, str]:
        """Bind the sockets on the I/O thread; return the bound (pub, ctl) endpoints or raise why not."""
        self.config.pub = check_endpoint(self.config.pub, self.config.curve)
        self.config.ctl = check_endpoint(self.config.ctl, self.config.curve)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
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
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._slow_thread is not None:  # a slow op still running is not waited for (its reply has nowhere to go)
            self._slow_jobs.put(None)

    def _close_wake_pipe(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None

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
            for endpoint in self.endpoints:  # ZeroMQ creates ipc sockets with the umask's mode: owner only
                if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
                    os.chmod(endpoint[len("ipc://"):], 0o600)
            if self.config.events_path is not None:
                self.config.events_path.parent.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(self.config.events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
                if self._jsonl.tell() and not _ends_with_newline(self.config.events_path):
                    self._jsonl.write("\n")  # a crash left a torn line: never glue our first event onto it
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
            self._close_wake_pipe()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(pub, ctl)
        finally:
            if self._jsonl is not None:
                try:
                    self._jsonl.flush()
                    os.fsync(self._jsonl.fileno())
                    self._jsonl.close()
                except OSError as err:
                    self._jsonl_failed(err)
            pub.close()
            ctl.close()
            if auth is not None:
                auth.stop()
            ctx.term()
            self._close_wake_pipe()
            self._unlink_ipc()
            self.io_cpu_s = time.thread_time()

    def _jsonl_failed(self, err: OSError) -> None:
        """events.jsonl cannot be written: stop writing it (subscribers still get every event), and report it once
        through ``on_write_error`` (the daemon then stops the run, with a checkpoint if one can still be written)."""
        jsonl, self._jsonl, self._unflushed = self._jsonl, None, False
        if jsonl is not None:
            with contextlib.suppress(OSError, ValueError):
                jsonl.close()
        message = f"cannot write {self.config.events_path}: {err.strerror or err}"
        if self.config.on_write_error is None:
            log.error("fts event bus: %s", message)
            return
        try:
            self.config.on_write_error(message)
        except Exception:
            log.exception("fts event bus: on_write_error failed")

    def _unlink_ipc(self) -> None:
        for endpoint in self.endpoints or ():
            if endpoint.startswith("ipc://"):
                try:
                    os.unlink(endpoint[len("ipc://") :])
                except OSError:
                    pass

    def _load_history(self) -> None:
        path = self.config.history_from
        if path is None or not path.is_file():
            return
        try:
            report = self.history.load(path)
        except OSError as err:
            log.warning("fts event bus: cannot read %s: %s", path, err)
            return
        if report.torn_tail or report.bad_lines:
            self.publish(ev.LOG, {"level": "warning", "message": f"history of earlier starts: {report.describe()}"})

    def _sleep_ms(self, now: float, next_batch: float) -> int:
        """How long the next poll may block. Within the gap after a batch: until it ends, unannounced (events
        published meanwhile cost their publisher no wake-up; a steady stream never does). After it, with nothing
        queued: until a heartbeat is due, announced, so that the next publish wakes this thread at once."""
        if now < next_batch:
            return math.ceil((next_batch - now) * 1000)  # ZeroMQ takes whole ms: never spin on a fraction
        if not self._queue.empty():
            return 0
        self._asleep = True
        if not self._queue.empty():  # published between the check and the flag: that publisher saw no flag
            self._asleep = False
            return 0
        heartbeat_due = self._last_send + self.config.heartbeat_s - now
        return math.ceil(max(0.0, min(self.config.poll_ms / 1000, heartbeat_due)) * 1000)

    def _loop(self, pub: zmq.Socket, ctl: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(ctl, zmq.POLLIN)
        assert self._wake_r is not None
        poller.register(self._wake_r, zmq.POLLIN)
        self._pub = pub
        self._send = gilsend.sender(pub)  # keeps the GIL: see gilsend
        self._load_history()
        gap = self.config.batch_ms / 1000
        next_batch = 0.0
        while True:
            try:
                ready = dict(poller.poll(self._sleep_ms(time.monotonic(), next_batch)))
                self._asleep = False
                if self._wake_r in ready:
                    while True:  # empty the pipe (non-blocking)
                        try:
                            if not os.read(self._wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                if ctl in ready:
                    self._serve(ctl)
                if self._slow_pending:
                    self._send_slow_replies(ctl)
                now = time.monotonic()
                if now >= next_batch:
                    sent = self._drain()
                    if sent:  # a backlog (a full turn) goes on right after the requests; else the gap holds
                        next_batch = now + (gap if sent < MAX_EVENTS_PER_TURN else 0.0)
                if now - self._last_send >= self.config.heartbeat_s:
                    self._emit(ev.HEARTBEAT, {"state": self.history.state.get("state"), "phase": self.history.phase})
                if self._unflushed and self._jsonl is not None and (
                    now - self._last_flush >= FLUSH_S or self._closing.is_set()
                ):
                    # readers of events.jsonl (tail -f, tests) see events within FLUSH_S; a write per batch would
                    # cost more than the batch
                    self._last_flush = now
                    try:
                        self._jsonl.flush()
                    except OSError as err:
                        self._jsonl_failed(err)
                    self._unflushed = False
                if self._closing.is_set() and self._queue.empty():
                    return
            except Exception:  # the bus must outlive any single bad event or request
                log.exception("fts event bus: unexpected error (continuing)")

    def _drain(self) -> int:
        sent = 0
        # lr and metric events (one per step and one per logging step: most of the stream) take a short path unless
        # a watcher wants them
        fast = {kind for kind in (ev.LR, ev.METRIC)
                if not any(kinds is None or kind in kinds for _, kinds in self._watchers)}
        # the batch is encoded first and sent in one burst, so that ZeroMQ's I/O thread and each subscriber find
        # it whole when they wake, rather than events arriving one per encoding (~10-30 us apart). A subscriber's
        # CPU per event fell from ~36 to ~26 us in a synthetic test (500 lr events/s of 6 groups beside a busy
        # Python thread, 3 runs each). Snapshots stay consistent: requests are answered only after the burst
        burst: list[tuple[bytes, bytes]] = []
        self._burst = burst
        try:
            while sent < MAX_EVENTS_PER_TURN:
                try:
                    kind, data, step, epoch, ts = self._queue.get_nowait()
                except queue.Empty:
                    break
                if self.dropped > self._dropped_seen:
                    self._account_drops()
                if kind is LR_ROW:
                    tags, values = data
                    if ev.LR not in fast or not self._emit_lr_row(tags, values, step, epoch, ts):
                        self._emit(ev.LR, {"lrs": dict(zip(tags, values))}, step, epoch, ts)
                elif kind not in fast or not self._emit_step(kind, data, step, epoch, ts):
                    self._emit(kind, data, step, epoch, ts)
                sent += 1
        finally:
            self._burst = None
            send = self._send
            for topic, body in burst:
                send(topic, body)
        if sent:
            self._last_send = time.monotonic()
        return sent

    def _emit_lr_row(self, tags: tuple[str, ...], values: list[float], step: int | None, epoch: int | None,
                     ts: float) -> bool:
        """:meth:`_emit_step` for an ``lr`` event from :meth:`publish_lr`."""
        body = self._encoder.lr_row(self.seq + 1, ts, tags, values, step, epoch)
        if body is None or len(body) > ev.MAX_EVENT_BYTES:
            return False
        self.seq += 1
        self.history.ingest_lr_row(step, epoch, tags, values)
        self._out(ev.StepEncoder.LR_TOPIC, body)
        return True

    def _emit_step(self, kind: str, data: dict[str, Any], step: int | None, epoch: int | None, ts: float) -> bool:
        """:meth:`_emit` for an ``lr`` or ``metric`` event, without building an Event or calling the json module
        (it holds the GIL for a third to a half of the time); False, having done nothing, if the event needs the
        general path."""
        seq = self.seq + 1
        if kind == ev.LR:
            lrs = data.get("lrs")
            if len(data) != 1 or type(lrs) is not dict:
                return False
            topic, body = ev.StepEncoder.LR_TOPIC, self._encoder.lr(seq, ts, lrs, step, epoch)
        else:
            metrics, stage = data.get("metrics"), data.get("stage")
            # the json module writes keys in the dict's order: the short path writes metrics, then stage
            if len(data) != 2 or type(metrics) is not dict or next(iter(data)) != "metrics":
                return False
            topic, body = ev.StepEncoder.METRIC_TOPIC, self._encoder.metric(seq, ts, metrics, stage, step, epoch)
        if body is None or len(body) > ev.MAX_EVENT_BYTES:
            return False
        self.seq = seq
        if kind == ev.LR:
            self.history.ingest_lr(step, epoch, lrs)
        else:
            self.history.ingest_metric(step, epoch, metrics, stage)
        self._out(topic, body)
        return True

    def _out(self, topic: bytes, body: bytes, durable: bool = False) -> None:
        """Send an encoded event (or keep it for the burst that ends the batch being drained), record it and count
        it."""
        if self._burst is not None:
            self._burst.append((topic, body))
        else:
            self._send(topic, body)
        self._record(body, durable)
        self.published += 1

    def _record(self, body: bytes, durable: bool = False) -> None:
        """Append an event's line to events.jsonl (written through at once if ``durable``, else flushed with the
        next FLUSH_S tick)."""
        if self._jsonl is None:
            return
        try:
            self._jsonl.write(body.decode("utf-8") + "\n")
            self._unflushed = True
            if durable:
                self._jsonl.flush()
                self._unflushed = False
        except OSError as err:
            self._jsonl_failed(err)

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
            frames = ev.encode_event(event)
        except (TypeError, ValueError) as err:  # a payload that is not JSON: say so instead of losing it silently
            event.kind, event.data = ev.LOG, {"level": "error", "message": f"unencodable {kind} event: {err}"}
            frames = ev.encode_event(event)
        if len(frames[1]) > ev.MAX_EVENT_BYTES:
            event.kind, event.data = ev.LOG, {"level": "error", "message": f"{kind} event too large to send"}
            frames = ev.encode_event(event)
        self.history.ingest(event)
        self._out(frames[0], frames[1], event.kind in DURABLE_KINDS)
        self._last_send = time.monotonic()
        for watcher, kinds in list(self._watchers):
            if kinds is None or event.kind in kinds:
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
            reply = self._answer(body, envelope)
            if reply is not None:  # None: a slow op, answered by the worker later
                if not self._queue.empty():
                    # what the op published (an accepted edit, the schedule it changes) is sent and recorded before
                    # the reply: a client told "queued" finds the event in events.jsonl even if the daemon dies next
                    while self._drain() >= MAX_EVENTS_PER_TURN:
                        pass
                self._reply(ctl, envelope, reply)

    def _reply(self, ctl: zmq.Socket, envelope: list[bytes], body: bytes) -> None:
        try:
            ctl.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # client gone (ROUTER_MANDATORY) or its queue is full: drop the reply
            pass

    def _answer(self, body: bytes, envelope: list[bytes]) -> bytes | None:
        """The reply to a request, or None when a slow op was handed to the worker (which replies later)."""
        req_id: Any = None
        try:
            req_id, op, args = ev.parse_request(body)
            self._check_args(op, args)
            if op in self._slow:
                self._defer(envelope, req_id, op, args)
                return None
            return ev.ok_reply(req_id, self._dispatch(op, args))
        except Exception as err:
            return self._error_reply(getattr(err, "req_id", None) or req_id, err)

    @staticmethod
    def _error_reply(req_id: Any, err: Exception) -> bytes:
        if isinstance(err, (ev.ProtocolError, OpError)):
            return ev.error_reply(req_id, str(err))
        if isinstance(err, (ValueError, TypeError, KeyError, RecursionError)):  # RecursionError: JSON nested too deep
            return ev.error_reply(req_id, f"bad request: {err}")
        log.error("fts event bus: control handler failed", exc_info=err)
        return ev.error_reply(req_id, f"internal error: {type(err).__name__}: {err}")

    def _defer(self, envelope: list[bytes], req_id: Any, op: str, args: dict[str, Any]) -> None:
        """Hand a slow op to the worker thread (started on first use)."""
        if self._slow_pending > MAX_SLOW_PENDING:
            raise OpError(f"busy: {self._slow_pending} slow requests are being answered; ask again later")
        if self._slow_thread is None:
            self._slow_thread = threading.Thread(target=self._slow_worker, name=f"fts-ops-{self.config.run}",
                                                 daemon=True)
            self._slow_thread.start()
        self._slow_pending += 1
        self._slow_jobs.put((envelope, req_id, self._handlers[op], args))

    def _slow_worker(self) -> None:
        while True:
            job = self._slow_jobs.get()
            if job is None:
                return
            envelope, req_id, handler, args = job
            try:
                reply = ev.ok_reply(req_id, handler(args))
            except Exception as err:
                reply = self._error_reply(req_id, err)
            self._slow_replies.put((envelope, reply))
            self._wake()

    def _send_slow_replies(self, ctl: zmq.Socket) -> None:
        while True:
            try:
                envelope, reply = self._slow_replies.get_nowait()
            except queue.Empty:
                return
            self._slow_pending -= 1
            self._reply(ctl, envelope, reply)

    def _check_args(self, op: str, args: dict[str, Any]) -> None:
        params = self._params.get(op)
        if params is None:
            raise OpError(f"op {op!r} is not available in this daemon")
        unknown = sorted(set(args) - params - {"client"})  # "client": an optional free-form client name
        if unknown:
            takes = ", ".join(sorted(params)) or "no arguments"
            raise OpError(f"{op} takes {takes}; unknown argument {unknown[0]!r}")

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        """The result of a (checked) request answered on the I/O thread."""
        if op == "hello":
            return self.hello()
        if op == "snapshot":
            series = args.get("series", "lists")
            if series not in ev.SERIES_FORMATS:
                raise OpError(f"snapshot: series must be one of {', '.join(ev.SERIES_FORMATS)}; got {series!r:.40}")
            return ev.RawJSON(self.history.snapshot_json(self.hello(), series))
        handler = self._handlers.get(op)
        if handler is None:
            raise OpError(f"op {op!r} is not available in this daemon")
        return handler(args)

    def hello(self) -> dict[str, Any]:
        pub, ctl = self.endpoints or (self.config.pub, self.config.ctl)
        initial = self.history.initial_scheduler
        return {
            # a start resumed in a later phase reports phase 0's scheduler as the run's recording has it
            **({"scheduler": initial} if initial is not None else {}),
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
            "snapshot_series": list(ev.SERIES_FORMATS),
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        """Counters for ``hello`` and ``snapshot`` replies. Called on the I/O thread, so ``io_cpu_s`` is the CPU
        time that thread has used: what the bus costs the machine, which a client can watch (e.g. while a
        subscriber is stalled)."""
        return {"published": self.published, "dropped": self.dropped, "io_cpu_s": round(time.thread_time(), 4)}
