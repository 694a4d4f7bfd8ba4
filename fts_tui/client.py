"""The live source: follow a daemon over ZeroMQ (``zmq.asyncio`` on the app's own event loop, no threads).

Sockets: SUB to the daemon's PUB (every ``fts.v1.*`` event) and DEALER to its ROUTER (control requests with ids,
so several can be in flight). Synchronisation is the ZeroMQ guide's Clone pattern:

1. connect SUB and subscribe first, then ask ``hello`` (which also gives the subscription time to reach the daemon);
2. ask ``snapshot``; meanwhile events queue, unread, in the SUB socket;
3. apply the snapshot, then read SUB and apply only events with ``seq`` above the snapshot's (the state drops
   the rest); a ``seq`` gap or another ``daemon`` id marks the state for a resync, and this loop snapshots again.

Liveness: the daemon sends a heartbeat when it has been quiet for a second, so any message is a sign of life.
After ``heartbeat_timeout`` seconds of silence the connection shows as *lost*; the client keeps asking ``hello``
(with backoff) and, when it answers, resyncs. If the run was found through the registry, the record is read again
on each retry, so a daemon that restarted on other endpoints is found too. Closing the TUI only closes sockets:
the daemon never waits for a subscriber, so quitting never affects training.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from fts_daemon import events as ev
from fts_daemon.history import final_state, run_state  # torch-free, like the registry
from fts_tui.source import DEFAULT_SCHEDULERS, PLAN_TIMEOUT_S, RequestError
from fts_tui.state import HEADER, PlanData, RunState, plan_args

if TYPE_CHECKING:
    from fts_daemon.registry import RunRecord

# while events keep arriving faster than they are applied, the app is still told this often that there is news
UPDATE_EVERY_S = 0.05


class ResolveError(ValueError):
    """``attach``'s target cannot be turned into endpoints (one line)."""


@dataclass
class Target:
    """Where a daemon listens and how to authenticate to it."""

    ctl: str
    pub: str | None = None  # None: take it from the daemon's hello
    run: str | None = None  # set when found through the registry (re-read on reconnect)
    server_key: bytes | None = None  # the daemon's CURVE public key (Z85)
    client_public: bytes | None = None
    client_secret: bytes | None = None

    def describe(self) -> str:
        where = self.run or self.ctl
        return f"{where}" + (" (CURVE)" if self.server_key else "")


def _load_key(value: str, want_secret: bool) -> tuple[bytes | None, bytes | None]:
    """A Z85 key given inline, or a zmq.auth certificate file (``.key`` or ``.key_secret``)."""
    path = Path(value).expanduser()
    if path.is_file():
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as err:
            raise ResolveError(f"cannot read CURVE key file {path}: {err}") from None
        if want_secret and secret is None:
            raise ResolveError(f"{path} holds no secret key (pass the .key_secret file)")
        return public, secret
    if len(value) != 40:
        raise ResolveError(f"{value!r} is neither a key file nor a 40-character Z85 key")
    return value.encode("ascii"), None


def _from_record(run: str | None) -> Target:
    from fts_daemon import registry

    try:
        return _target_of(registry.find_run(run))
    except registry.RegistryError as err:
        raise ResolveError(str(err)) from None


def _target_of(record: RunRecord) -> Target:
    key = record.curve_server_key.encode("ascii") if record.curve_server_key else None
    return Target(ctl=record.ctl, pub=record.pub, run=record.run, server_key=key)


def resolve_target(
    target: str | None, events: str | None = None, server_key: str | None = None, client_key: str | None = None
) -> Target:
    """``attach``'s argument → a :class:`Target`: an endpoint, a run id, a run directory, or nothing (latest)."""
    if target and "://" in target:
        out = Target(ctl=target, pub=events)
    elif target and Path(target).expanduser().is_dir():
        from fts_daemon import registry

        wanted = Path(target).expanduser().resolve()
        matches = [r for r in registry.iter_records() if Path(r.run_dir).resolve() == wanted]
        if not matches:
            raise ResolveError(f"no registered run writes to {wanted} (use `fts-tui replay {target}` for a finished run)")
        out = _from_record(matches[-1].run)
    elif target and ("/" in target or target.startswith((".", "~"))):  # meant as a run directory
        raise ResolveError(f"no such run directory: {Path(target).expanduser()}")
    else:
        out = _from_record(target)
    if events:
        out.pub = events
    if server_key:
        out.server_key = _load_key(server_key, want_secret=False)[0]
    if out.server_key is not None:
        if client_key:
            out.client_public, out.client_secret = _load_key(client_key, want_secret=True)
        else:
            out.client_public, out.client_secret = zmq.curve_keypair()
    for endpoint in (out.ctl, out.pub):
        if endpoint and not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ResolveError(f"unsupported endpoint {endpoint!r} (tcp://, ipc:// or inproc://)")
    return out


def snapshot_args(hello: dict[str, Any]) -> dict[str, Any]:
    """The ``snapshot`` request's arguments for a daemon that said ``hello``: packed series where it offers them
    (~0.2 ms to decode where JSON numbers take ~2 ms for 6 series of 1000 points, and the charts take the columns
    in one copy); the list form from a daemon that does not."""
    offered = hello.get("snapshot_series")
    return {"series": "packed"} if isinstance(offered, list) and "packed" in offered else {}


def _ended_note(record: Any) -> str:
    """What to do about a run whose daemon has exited: resume it if a stop left a checkpoint, else replay it."""
    end: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        end = final_state(record.run_dir) or {}
    if end.get("reason") == "stopped" and end.get("checkpoint"):
        return (f"run stopped; its daemon has exited: `fts-daemon start --resume --run-dir {record.run_dir}` "
                "continues it")
    return f"run {run_state(record)}; its daemon has exited: `fts-tui replay {record.run_dir}` shows the run"


class LiveSource:
    """Keeps a :class:`RunState` in step with a daemon; see the module docstring."""

    read_only = False

    def __init__(
        self,
        target: Target,
        state: RunState | None = None,
        *,
        request_timeout: float = 5.0,
        heartbeat_timeout: float = 3.5,
        plan_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.target = target
        self.state = state or RunState()
        self.request_timeout = request_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.plan_interval = plan_interval
        self.clock = clock
        self._ctx = context
        self._own_ctx = context is None
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:6]
        self._pending: dict[str, asyncio.Future[tuple[bool, Any]]] = {}
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_endpoint: str | None = None
        self._sub_sync: zmq.Socket | None = None
        self._plan_task: asyncio.Task[None] | None = None
        self._plan_rev = -1
        self._plan_at = -1e9
        self._plan_wait = plan_interval  # grows while plan requests fail (e.g. before training starts)
        self._plan_refused_stepless = False  # the last plan request failed while the run had no step yet
        self.hello: dict[str, Any] = {}
        self.snapshots = 0  # snapshots applied (tests read it)
        self.snapshot_series = ""  # how the last one carried its series: "lists" or "packed"
        self.label = target.describe()
        self.on_update: Callable[[], None] | None = None  # see Source
        self._updated_at = -1e9  # time.monotonic() of the last on_update call
        self.pace: Callable[[], float | None] | None = None  # see Source

    # ------------------------------------------------------------------------------------------------ sockets

    @property
    def ctx(self) -> zmq.asyncio.Context:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        return self._ctx

    def _secure(self, sock: zmq.Socket) -> None:
        t = self.target
        if t.server_key is not None:
            sock.curve_serverkey = t.server_key
            sock.curve_publickey = t.client_public
            sock.curve_secretkey = t.client_secret
        if t.ctl.startswith("tcp://"):
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.LINGER, 0)

    def _open_dealer(self) -> None:
        self._close_dealer()
        dealer = self.ctx.socket(zmq.DEALER)
        self._secure(dealer)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no queueing requests to a daemon that is not there
        dealer.setsockopt(zmq.RCVHWM, 1000)
        dealer.connect(self.target.ctl)
        self._dealer = dealer
        self._reader = asyncio.get_running_loop().create_task(self._read_replies(dealer))

    def _close_dealer(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RequestError("connection reset"))
        self._pending.clear()

    def _open_sub(self, endpoint: str) -> None:
        if self._sub is not None and self._sub_endpoint == endpoint:
            return
        self._close_sub()
        sub = self.ctx.socket(zmq.SUB)
        self._secure(sub)
        sub.setsockopt(zmq.RCVHWM, 200_000)  # bursts while a snapshot is on its way; gaps trigger a resync anyway
        sub.setsockopt(zmq.MAXMSGSIZE, ev.MAX_EVENT_BYTES + 1024)
        sub.setsockopt(zmq.SUBSCRIBE, ev.TOPIC_PREFIX.encode("ascii"))
        sub.connect(endpoint)
        self._sub, self._sub_endpoint = sub, endpoint
        # a plain (blocking-API) view of the same socket: draining a burst with NOBLOCK costs no Future per message
        self._sub_sync = zmq.Socket.shadow(sub.underlying)

    def _close_sub(self) -> None:
        if self._sub is not None:
            self._sub_sync = None
            self._sub.close(linger=0)
            self._sub, self._sub_endpoint = None, None

    async def close(self) -> None:
        if self._plan_task is not None:
            self._plan_task.cancel()
        self._close_dealer()
        self._close_sub()
        if self._own_ctx and self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ------------------------------------------------------------------------------------------------ requests

    async def _read_replies(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frames = await dealer.recv_multipart()
            try:
                req_id, ok, payload = ev.parse_reply(frames[-1])
            except ev.ProtocolError:
                continue
            fut = self._pending.pop(str(req_id), None)
            if fut is not None and not fut.done():
                fut.set_result((ok, payload))

    @staticmethod
    async def _roundtrip(dealer: zmq.asyncio.Socket, body: bytes, fut: asyncio.Future[tuple[bool, Any]]) -> tuple[bool, Any]:
        await dealer.send(body)
        return await fut

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send ``op``; return its result, or raise :class:`RequestError` (the daemon's reason, or a timeout)."""
        if self._dealer is None:
            raise RequestError("not connected to the daemon")
        if op != "hello" and self.state.connection in ("lost", "ended"):  # hello is how a reconnect asks
            raise RequestError(f"not connected to the daemon (connection {self.state.connection})")
        timeout = self.request_timeout if timeout is None else timeout
        req_id = f"{self._prefix}-{next(self._ids)}"
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            ok, payload = await asyncio.wait_for(self._roundtrip(self._dealer, ev.request(op, req_id, **args), fut), timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"no reply to {op} within {timeout:g}s") from None
        except zmq.ZMQError as err:
            raise RequestError(f"{op}: {err}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)  # Python 3.11+; on 3.10 a cancel cannot be told apart
            if task is not None and (cancelling is None or cancelling()):  # our caller is being cancelled: let it be
                raise
            # the socket was closed under a send waiting for a peer (the daemon went away): an answer, not a cancel
            raise RequestError(f"{op}: the connection to the daemon was lost") from None
        finally:
            self._pending.pop(req_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a reset that no one awaited is no "never retrieved" warning
        if not ok:
            raise RequestError(str(payload))
        return payload

    def schedulers(self) -> list[str]:
        offered = self.hello.get("schedulers")
        return [str(s) for s in offered] if isinstance(offered, list) and offered else list(DEFAULT_SCHEDULERS)

    # ------------------------------------------------------------------------------------------------ main loop

    async def run(self) -> None:
        backoff = 0.25
        try:
            while True:
                if await self._connect():
                    backoff = 0.25
                    await self._follow()
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self.close()

    async def _connect(self) -> bool:
        """(Re)open sockets as needed and ask ``hello``; True once the daemon answered."""
        record = None
        if self.target.run is not None:  # found through the registry: it may have restarted elsewhere
            from fts_daemon import registry

            with contextlib.suppress(registry.RegistryError):
                record = registry.find_run(self.target.run)
                fresh = _target_of(record)
                if (fresh.ctl, fresh.pub) != (self.target.ctl, self.target.pub):
                    self.target = replace(self.target, ctl=fresh.ctl, pub=fresh.pub, server_key=fresh.server_key or self.target.server_key)
                    self._close_dealer()
        if self._dealer is None:
            self._open_dealer()
        if self.target.pub is not None:
            self._open_sub(self.target.pub)  # subscribe before anything else (Clone pattern)
        try:
            hello = await self.request("hello", timeout=min(self.request_timeout, 2.0))
        except RequestError as err:
            if self.state.connection not in ("lost", "connecting", "ended"):
                self.state.add_log("warning", "connection", f"daemon not answering: {err}", time.time())
            if record is not None and not record.alive:
                # the registered daemon has exited (attached after the run ended, or it crashed): say so, and go on
                # asking, in case `fts-daemon start --resume` brings the run back
                if self.state.last_heard is None or self.state.status not in ("finished", "failed"):
                    # nothing heard from it, or it died mid-run: its state is the registry's ("dead" when killed),
                    # or the end its recording holds if it was killed just after recording it
                    self.state.status = run_state(record)
                    self.state.mark(HEADER)
                if self.state.connection != "ended":  # read the recording's tail once, not at every retry
                    self.state.set_connection("ended", _ended_note(record))
            elif self.state.connection not in ("lost", "ended") and self.state.last_heard is not None:
                self.state.set_connection("lost")
            self._close_dealer()  # a fresh DEALER: no stale requests queued to a dead peer
            return False
        self.hello = hello if isinstance(hello, dict) else {}
        pub = self.target.pub or self.hello.get("pub")
        if not pub:
            self.state.set_connection("lost", "the daemon did not say where it publishes; pass --events")
            return False
        self._open_sub(str(pub))
        return True

    async def _sync(self) -> bool:
        reason = self.state.resync_reason
        self.state.set_connection("resyncing", reason)
        try:
            snap = await self.request("snapshot", timeout=max(self.request_timeout, 10.0), **snapshot_args(self.hello))
        except RequestError as err:
            self.state.set_connection("lost", f"snapshot failed: {err}")
            return False
        had_run = self.state.run is not None
        try:
            self.state.apply_snapshot(snap)
        except ev.ProtocolError as err:  # raised before the state changed: what the screen shows stays
            self.state.set_connection("lost", f"snapshot unreadable: {err}")
            return False
        self.snapshot_series = str(snap.get("series", "lists"))
        self.snapshots += 1
        self.state.last_heard = self.clock()
        if had_run:
            note = f"resynchronized at seq {self.state.last_seq}" + (f" ({reason})" if reason else "")
            self.state.add_log("warning", "connection", note, time.time())
        self.state.set_connection("live")
        self._updated()
        return True

    async def _follow(self) -> None:
        """Snapshot, then apply events until the daemon goes quiet for too long."""
        if not await self._sync():
            return
        assert self._sub is not None
        sub = self._sub
        while True:
            if self.state.needs_resync:
                if not await self._sync():
                    return
            self._maybe_plan()
            if await sub.poll(200, zmq.POLLIN):
                emptied = self._drain()
                # the app draws what has arrived once the socket ran dry; while a stream never lets it, every
                # UPDATE_EVERY_S
                if emptied or time.monotonic() - self._updated_at >= UPDATE_EVERY_S:
                    self._updated()
                pace = self.pace() if emptied and self.pace is not None else None
                # the app draws once a second or so: events wait in the socket (RCVHWM holds minutes of them)
                # rather than wake this process for each daemon batch, every wake-up taking a core from training
                await asyncio.sleep(pace or 0)
                continue
            silent = self.clock() - (self.state.last_heard or self.clock())
            if silent > self.heartbeat_timeout:
                if self.state.finished:  # a daemon exits when its run ends: that is no failure
                    self.state.set_connection("ended", f"run {self.state.status}; the daemon has exited")
                else:
                    self.state.set_connection("lost")
                    self.state.add_log("error", "connection", f"no heartbeat from the daemon for {silent:.0f}s", time.time())
                self._close_dealer()
                return

    def _updated(self) -> None:
        self._updated_at = time.monotonic()
        if self.on_update is not None:
            self.on_update()

    def _drain(self, budget_s: float = 0.01) -> bool:
        """Apply what the SUB socket holds, for at most ``budget_s`` (then the UI gets the loop back); True if the
        socket ran dry."""
        state, sub = self.state, self._sub_sync
        assert sub is not None
        emptied = False
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                emptied = True
                break
            state.last_heard = self.clock()
            try:
                event = ev.decode_event(frames)
            except ev.ProtocolError as err:
                state.add_log("warning", "connection", f"unreadable event skipped: {err}", time.time())
                continue
            state.apply(event)
            if state.needs_resync:
                break
        if state.connection != "live" and not state.needs_resync:
            state.set_connection("live")
        return emptied

    # ------------------------------------------------------------------------------------------------ plans

    def _maybe_plan(self) -> None:
        if "plan" not in (self.hello.get("ops") or ()):
            if self.state.plan_error is None and self.hello:
                self.state.set_plan(None, "this daemon has no plan op")
            return
        if self.state.schedule_rev == self._plan_rev or (self._plan_task is not None and not self._plan_task.done()):
            return
        if self._plan_refused_stepless and self.state.step is not None:
            # refused for want of a training step, and training has one now: ask at once, not after the backoff
            self._plan_refused_stepless, self._plan_wait, self._plan_at = False, self.plan_interval, -1e9
        if self.clock() - self._plan_at < self._plan_wait:
            return
        self._plan_rev, self._plan_at = self.state.schedule_rev, self.clock()
        self.state.set_planning(True)
        self._plan_task = asyncio.get_running_loop().create_task(self._fetch_plan())

    async def _fetch_plan(self) -> None:
        try:
            await self._fetch_plan_once()
        finally:
            self.state.set_planning(False)

    async def _fetch_plan_once(self) -> None:
        try:
            result = await self.request("plan", timeout=max(self.request_timeout, PLAN_TIMEOUT_S), **plan_args(self.state))
        except RequestError as err:
            self.state.set_plan(None, str(err))
            self._plan_refused_stepless = self.state.step is None
            if not self.state.finished:
                # "no plan yet" passes once training starts: ask again without a schedule change, less often each time
                self._plan_rev = -1
                self._plan_wait = min(self._plan_wait * 2, 30.0)
            return
        self._plan_wait = self.plan_interval
        # read and decimated for the charts off the event loop (~50 ms for a 20,000-step plan of 6 groups)
        self.state.set_plan(await asyncio.to_thread(PlanData.for_charts, result) if isinstance(result, dict) else None)

