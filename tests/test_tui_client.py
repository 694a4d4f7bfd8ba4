"""The live client against the daemon's real event bus (in process, tcp loopback): Clone-pattern attach, gap and
restart resyncs, lost/reconnect, control requests, registry resolution, CURVE."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq
import zmq.auth

from fts_daemon import registry
from fts_daemon.bus import BusConfig, CurveKeys, EventBus, OpError
from fts_daemon.client import Control
from fts_tui.client import LiveSource, ResolveError, Target, resolve_target, snapshot_args
from fts_tui.source import RequestError
from fts_tui.state import RunState
from fts_tui.views import header_lines
from tests.data.make_recordings import build_run, plan_for

EVENTS = build_run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bus(pub: str = "tcp://127.0.0.1:0", ctl: str = "tcp://127.0.0.1:0", curve: CurveKeys | None = None) -> EventBus:
    bus = EventBus(BusConfig(run="demo-explicit-reinit", pub=pub, ctl=ctl, heartbeat_s=0.2, curve=curve))

    def queue_edit(args: dict) -> dict:
        if args.get("phase") != 3:
            raise OpError(f"phase {args.get('phase')} is already done; only upcoming phases (> 2) can be edited")
        return {"id": "e9", "phase": 3, "changes": args["changes"], "status": "queued", "error": None, "created": 1.0, "applied_step": None}

    bus.register("queue_edit", queue_edit, ("phase", "changes"))
    bus.register("plan", lambda args: plan_for(args.get("changes")), ("phase", "changes", "transition_epochs"))
    bus.start()
    return bus


def publish(bus: EventBus, events: list) -> None:
    for e in events:
        bus.publish(e.kind, e.data, e.step, e.epoch)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def bus():
    b = start_bus()
    yield b
    b.close()


@contextlib.asynccontextmanager
async def following(source: LiveSource) -> AsyncIterator[LiveSource]:
    """Run the client until the block ends (as the app's worker would), once it is live."""
    task = asyncio.get_running_loop().create_task(source.run())
    try:
        await until(lambda: source.state.connection == "live")
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_late_attach_then_live_events(bus: EventBus) -> None:
    publish(bus, EVENTS[:300])
    await until(lambda: bus.seq >= 300)
    pub, ctl = bus.endpoints
    # the PUB endpoint comes from hello
    async with following(LiveSource(Target(ctl=ctl), heartbeat_timeout=2.0)) as source:
        s = source.state
        assert s.last_seq >= 300 and s.run == "demo-explicit-reinit" and s.phase == 1
        assert source.hello["pub"] == pub and "plan" in source.hello["ops"]
        # the series came packed (the daemon offers it) and show what the list form shows
        assert source.snapshot_series == "packed"
        from_lists = RunState()
        with Control(ctl) as control:
            from_lists.apply_snapshot(control.request("snapshot"))
        assert {t: v.points() for t, v in s.lr.items()} == {t: v.points() for t, v in from_lists.lr.items()}
        assert {t: v.points() for t, v in s.metrics.items()} == {t: v.points() for t, v in from_lists.metrics.items()}
        assert s.lr and s.metrics
        publish(bus, EVENTS[300:])
        await until(lambda: s.status == "finished")
        assert source.snapshots == 1 and s.last_seq == bus.seq
        assert (s.phase, s.step, s.epoch) == (3, 560, 13)
        assert len(s.lr["Explicit_Reinit_LR_Scheduler/phase0"]) >= 300
        assert s.edits["e1"].status == "applied" and s.edits["e2"].status == "cancelled"
        await until(lambda: s.plan is not None)  # asked by itself: the daemon offers `plan`
        assert len(s.plan.steps) == 560
        assert s.plan._chart is not None  # the charts' copy was made with the plan, on a worker thread


@pytest.mark.asyncio
async def test_a_seq_gap_triggers_a_resync(bus: EventBus) -> None:
    publish(bus, EVENTS[:200])
    async with following(LiveSource(Target(ctl=bus.endpoints[1]), heartbeat_timeout=2.0)) as source:
        bus.dropped += 3  # as if the training thread's queue had overflowed: the bus skips 3 seq numbers
        publish(bus, EVENTS[200:260])
        await until(lambda: source.snapshots == 2 and source.state.last_seq == bus.seq)
        s = source.state
        assert s.connection == "live" and not s.needs_resync
        assert any("resynchronized" in e.text and "missed events" in e.text for e in s.log)
        assert any("3 lr/metric events dropped" in e.text for e in s.log)


@pytest.mark.asyncio
async def test_daemon_goes_away_and_comes_back() -> None:
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    buses = [start_bus(pub, ctl)]
    publish(buses[0], EVENTS[:100])
    try:
        async with following(LiveSource(Target(ctl=ctl, pub=pub), heartbeat_timeout=1.0, request_timeout=1.0)) as source:
            s = source.state
            old_daemon = s.daemon
            buses[0].close()
            await until(lambda: s.connection == "lost", timeout=5)
            assert s.last_heard is not None and any("no heartbeat" in e.text for e in s.log)
            buses.append(start_bus(pub, ctl))  # a restarted daemon: same endpoints, new daemon id, seq from 1
            publish(buses[1], EVENTS[100:150])
            await until(lambda: s.connection == "live" and s.daemon == buses[1].daemon, timeout=15)
            assert s.daemon != old_daemon
            await until(lambda: s.last_seq == buses[1].seq)
    finally:
        buses[-1].close()


@pytest.mark.asyncio
async def test_control_requests(bus: EventBus) -> None:
    publish(bus, EVENTS[:500])
    async with following(LiveSource(Target(ctl=bus.endpoints[1]), heartbeat_timeout=2.0)) as source:
        edit = await source.request("queue_edit", phase=3, changes={"lr": 2e-5})
        assert edit["id"] == "e9" and edit["status"] == "queued"
        with pytest.raises(RequestError, match="phase 1 is already done"):
            await source.request("queue_edit", phase=1, changes={"lr": 2e-5})
        with pytest.raises(RequestError, match="not available"):
            await source.request("cancel_edit", edit_id="e9")
        plan = await source.request("plan", phase=3, changes={"lr": 1e-4})
        assert plan["series"]["Explicit_Reinit_LR_Scheduler/phase3"][-1] == pytest.approx(1e-4 * 0.8**3)
    with pytest.raises(RequestError, match="not connected"):
        await source.request("hello")


@pytest.mark.asyncio
async def test_request_times_out_when_nobody_answers() -> None:
    source = LiveSource(Target(ctl=f"tcp://127.0.0.1:{free_port()}"), request_timeout=0.3)
    source._open_dealer()
    with pytest.raises(RequestError, match="no reply to hello within 0.3s"):
        await source.request("hello")
    await source.close()


def test_resolve_target_from_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTS_RUNTIME_DIR", str(tmp_path / "rt"))
    with pytest.raises(ResolveError, match="no live fts-daemon run"):
        resolve_target(None)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    import os

    registry.write_record(registry.RunRecord(run="r1", pid=os.getpid(), daemon="d1", run_dir=str(run_dir),
                                             pub="ipc:///x.pub", ctl="ipc:///x.ctl", state="training"))
    for arg in (None, "r1", str(run_dir)):
        t = resolve_target(arg)
        assert (t.ctl, t.pub, t.run) == ("ipc:///x.ctl", "ipc:///x.pub", "r1")
    t = resolve_target("tcp://10.0.0.5:7001", events="tcp://10.0.0.5:7000")
    assert (t.ctl, t.pub, t.run, t.server_key) == ("tcp://10.0.0.5:7001", "tcp://10.0.0.5:7000", None, None)
    with pytest.raises(ResolveError, match="no run named"):
        resolve_target("nope")
    with pytest.raises(ResolveError, match=f"no such run directory: {tmp_path / 'gone'}"):
        resolve_target(str(tmp_path / "gone"))  # a path, not an (invalid) run id
    with pytest.raises(ResolveError, match="Z85"):
        resolve_target("tcp://10.0.0.5:7001", server_key="short")


@pytest.mark.asyncio
async def test_attaching_to_a_run_whose_daemon_has_exited_says_so_and_waits_for_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fts-tui attach RUN` after the run ended used to sit at "connecting" with nothing to say: it now shows that
    the daemon has exited and how to see the run, and still goes live when the run is started again."""
    import subprocess
    import sys

    monkeypatch.setenv("FTS_RUNTIME_DIR", str(tmp_path / "rt"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "runs" / "r2"
    port_pub, port_ctl = free_port(), free_port()
    pub, ctl = f"tcp://127.0.0.1:{port_pub}", f"tcp://127.0.0.1:{port_ctl}"
    registry.write_record(registry.RunRecord(run="r2", pid=int(gone.stdout), daemon="d0", run_dir=str(run_dir),
                                             pub=pub, ctl=ctl, state="finished"))
    source = LiveSource(resolve_target("r2"), request_timeout=0.5, heartbeat_timeout=1.5)
    task = asyncio.get_running_loop().create_task(source.run())
    try:
        await until(lambda: source.state.connection == "ended")
        note = source.state.connection_note
        assert "run finished" in note and "daemon has exited" in note and f"fts-tui replay {run_dir}" in note
        assert source.state.status == "finished"  # the header's run state, not "starting"
        restarted = start_bus(pub=pub, ctl=ctl)  # `fts-daemon start --resume`: the same run, alive again
        try:
            import os

            registry.update_record("r2", pid=os.getpid(), state="training")
            publish(restarted, EVENTS[:50])
            await until(lambda: source.state.connection == "live" and source.state.step is not None)
        finally:
            restarted.close()
        # killed mid-run: the registry still says training, but its pid is gone. The header said "● training" with
        # the last steps/s under "ended"
        registry.update_record("r2", pid=int(gone.stdout))
        await until(lambda: source.state.connection == "ended", timeout=15)
        assert source.state.status == "dead"
        header = "".join(cell for cell, _ in header_lines(source.state, now=time.time(), source="live")[0])
        assert "● dead" in header and "– steps/s" in header, header
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_curve_keys_over_tcp(tmp_path: Path) -> None:
    """A daemon bound with CURVE (what a non-loopback bind needs) only talks to authorized client keys."""
    keys = tmp_path / "keys"
    (keys / "authorized_clients").mkdir(parents=True)
    zmq.auth.create_certificates(keys, "server")
    client_pub, client_secret = zmq.auth.create_certificates(keys, "client")
    Path(client_pub).rename(keys / "authorized_clients" / "client.key")
    curve = CurveKeys.from_dir(keys)
    bus = start_bus(curve=curve)
    publish(bus, EVENTS[:50])
    try:
        await until(lambda: bus.seq >= 50)  # sent in batches: the snapshot must hold all 50
        pub, ctl = bus.endpoints
        target = resolve_target(ctl, events=pub, server_key=str(keys / "server.key"), client_key=str(client_secret))
        async with following(LiveSource(target, heartbeat_timeout=2.0)) as source:
            assert source.state.last_seq >= 50 and "(CURVE)" in source.label
        # a key pair the daemon does not know gets no answer
        stranger = resolve_target(ctl, events=pub, server_key=curve.public.decode())
        outsider = LiveSource(stranger, request_timeout=0.5)
        outsider._open_dealer()
        with pytest.raises(RequestError, match="no reply"):
            await outsider.request("hello")
        await outsider.close()
    finally:
        bus.close()


def plan_bus(ready: Callable[[], bool], calls: list[float]) -> EventBus:
    """A bus whose ``plan`` op refuses as a daemon does before training starts until ``ready()``; ``calls`` gets the
    time of each request."""

    def plan(args: dict) -> dict:
        calls.append(time.monotonic())
        if not ready():
            raise OpError("no plan yet: the number of steps per epoch is known once training starts")
        return plan_for(args.get("changes"))

    b = EventBus(BusConfig(run="demo-explicit-reinit", pub="tcp://127.0.0.1:0", ctl="tcp://127.0.0.1:0", heartbeat_s=0.2))
    b.register("plan", plan, ("phase", "changes", "transition_epochs"))
    b.start()
    return b


@pytest.mark.asyncio
async def test_plan_is_asked_again_after_no_plan_yet() -> None:
    """A TUI attached before training starts gets "no plan yet", then the plan without any schedule change."""
    calls: list[float] = []
    b = plan_bus(lambda: len(calls) >= 3, calls)
    try:
        publish(b, EVENTS[:50])
        await until(lambda: b.seq >= 50)
        async with following(LiveSource(Target(ctl=b.endpoints[1]), heartbeat_timeout=2.0, plan_interval=0.1)) as source:
            await until(lambda: source.state.plan_error is not None and "no plan yet" in source.state.plan_error)
            await until(lambda: source.state.plan is not None)
            assert source.state.plan_error is None and len(calls) == 3
            assert calls[2] - calls[1] >= 0.3  # waits 0.1 * 2 * 2 after two failures: asked less often while it fails
    finally:
        b.close()


@pytest.mark.asyncio
async def test_plan_is_asked_at_once_when_training_has_its_first_step() -> None:
    """Refused for want of a training step, the plan is asked for again as soon as an event carries one, not after
    the backoff (4 s here after one refusal): the TUI attached to a starting daemon shows the plan with the first
    steps."""
    calls: list[float] = []
    training = False
    b = plan_bus(lambda: training, calls)
    try:
        b.publish("state", {"state": "starting", "error": None})
        async with following(LiveSource(Target(ctl=b.endpoints[1]), heartbeat_timeout=2.0, plan_interval=2.0)) as source:
            await until(lambda: source.state.plan_error is not None)
            assert source.state.step is None and len(calls) == 1
            training = True
            began = time.monotonic()
            b.publish("lr", {"lrs": {"lr-SGD/pg1": 0.1}}, 0, 0)
            await until(lambda: source.state.plan is not None)
            assert len(calls) == 2 and calls[1] - began < 2.0, calls  # the backoff alone would wait until ~4 s
    finally:
        b.close()


def test_packed_snapshots_only_from_a_daemon_that_offers_them() -> None:
    assert snapshot_args({"snapshot_series": ["lists", "packed"]}) == {"series": "packed"}
    for hello in ({}, {"snapshot_series": ["lists"]}, {"snapshot_series": "packed"}, {"snapshot_series": None}):
        assert snapshot_args(hello) == {}  # a daemon from before packed series, or a malformed hello: lists


@pytest.mark.asyncio
async def test_the_app_hears_of_each_burst_once_it_is_applied(bus: EventBus) -> None:
    publish(bus, EVENTS[:100])
    await until(lambda: bus.seq >= 100)
    source = LiveSource(Target(ctl=bus.endpoints[1]), heartbeat_timeout=2.0)
    seen: list[int] = []  # the state's seq each time the source says there is something to draw
    source.on_update = lambda: seen.append(source.state.last_seq)
    async with following(source):
        await until(lambda: bool(seen))
        assert seen[0] >= 100  # the snapshot
        publish(bus, EVENTS[100:200])
        await until(lambda: seen[-1] == bus.seq)  # the burst, whole, before the app was told
        assert len(seen) < 1 + 100  # not once per event


@pytest.mark.asyncio
async def test_a_paced_source_reads_once_a_frame_and_loses_nothing(bus: EventBus) -> None:
    """While the app's CPU budget spaces frames 0.4 s apart, the source reads the socket as seldom: events published
    20 ms apart (sent in the daemon's 100 ms batches) reach the app in bursts ~0.4 s apart, every event in order."""
    publish(bus, EVENTS[:100])
    await until(lambda: bus.seq >= 100)
    gaps: dict[str, float] = {}
    for pace, burst in ((None, EVENTS[100:200]), (0.4, EVENTS[200:300])):
        source = LiveSource(Target(ctl=bus.endpoints[1]), heartbeat_timeout=5.0)
        updates: list[float] = []  # when the source told the app there was news
        source.on_update = lambda updates=updates: updates.append(time.monotonic())
        source.pace = lambda pace=pace: pace
        async with following(source):
            start = len(updates)
            for e in burst:
                bus.publish(e.kind, e.data, e.step, e.epoch)
                await asyncio.sleep(0.02)
            await until(lambda source=source: source.state.last_seq == bus.seq)
            times = updates[start:]
            gaps[str(pace)] = statistics.median(b - a for a, b in zip(times, times[1:]))
            assert not source.state.needs_resync and source.snapshots == 1  # no gap: nothing was dropped
    assert gaps["None"] < 0.2  # the daemon's own pace (100 ms batches), or faster
    assert gaps["0.4"] >= 0.38  # the app's


@pytest.mark.asyncio
async def test_a_plan_in_the_making_is_shown_as_such() -> None:
    """A long run's plan takes the daemon tens of seconds: meanwhile the state says it is planning (the LR chart's
    subtitle reads "planning…"), and stops saying so once the plan, or its refusal, is in."""
    release = threading.Event()

    def plan(args: dict) -> dict:
        release.wait(10)
        return plan_for(args.get("changes"))

    b = EventBus(BusConfig(run="demo-explicit-reinit", pub="tcp://127.0.0.1:0", ctl="tcp://127.0.0.1:0", heartbeat_s=0.2))
    b.register("plan", plan, ("phase", "changes", "transition_epochs"), slow=True)
    b.start()
    try:
        publish(b, EVENTS[:50])
        await until(lambda: b.seq >= 50)
        async with following(LiveSource(Target(ctl=b.endpoints[1]), heartbeat_timeout=2.0)) as source:
            await until(lambda: source.state.planning)
            await asyncio.sleep(0.3)
            assert source.state.planning and source.state.plan is None  # still waiting, heartbeats and all
            release.set()
            await until(lambda: source.state.plan is not None)
            assert not source.state.planning
    finally:
        release.set()
        b.close()


@pytest.mark.asyncio
async def test_a_request_to_a_daemon_that_went_away_is_refused_not_left_hanging() -> None:
    """The edit form waited on "sending…" forever: the closed socket cancelled the send, a CancelledError it did not
    expect. Now a RequestError, first as the connection is lost, then at once while it stays lost."""
    bus = start_bus()
    publish(bus, EVENTS[:50])
    async with following(LiveSource(Target(ctl=bus.endpoints[1]), heartbeat_timeout=1.0, request_timeout=5.0)) as source:
        bus.close()
        with pytest.raises(RequestError, match="the connection to the daemon was lost|not connected"):
            await asyncio.wait_for(source.request("queue_edit", phase=3, changes={"lr": 1e-5}), 10)
        await until(lambda: source.state.connection == "lost", timeout=10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RequestError, match=r"not connected to the daemon \(connection lost\)"):
            await source.request("queue_edit", phase=3, changes={"lr": 1e-5})
        assert loop.time() - t0 < 0.5
