"""The event bus on real ZeroMQ sockets (ipc in a private dir, tcp on 127.0.0.1): no Trainer involved."""

from __future__ import annotations

import json
import math
import random
from array import array
from pathlib import Path

import pytest
import zmq
from hypothesis import example, given
from hypothesis import strategies as st

from fts_daemon import events as ev
from fts_daemon.bus import BindRefused, BusConfig, CurveKeys, Downsampler, EventBus, OpError, RunHistory, check_endpoint
from fts_daemon.client import CloneTracker, Control, ControlError, CurveClientKeys, Follower

from .daemon_support import private_runtime_dir, read_events, wait_for


@pytest.fixture
def rt(monkeypatch: pytest.MonkeyPatch):
    with private_runtime_dir(monkeypatch) as path:
        yield path


def make_bus(rt: Path, tmp_path: Path, **kw) -> EventBus:
    cfg = BusConfig(run="t", pub=f"ipc://{rt}/t.pub", ctl=f"ipc://{rt}/t.ctl", events_path=tmp_path / "events.jsonl",
                    **kw)
    bus = EventBus(cfg)
    bus.start()
    return bus


def drained(bus: EventBus, seq: int) -> bool:
    return bus.seq >= seq and bus._queue.empty()


def test_events_arrive_in_order_and_match_the_jsonl(rt: Path, tmp_path: Path) -> None:
    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    try:
        with Follower(*bus.endpoints) as follower:
            stream = follower.follow(timeout=2.0)
            kind, snap = next(stream)
            assert kind == "snapshot" and snap["run"] == "t" and snap["daemon"] == bus.daemon
            for step in range(300):
                bus.publish(ev.LR, {"lrs": {"lr-AdamW/pg1": 0.1 / (step + 1)}}, step, step // 10)
                if step % 50 == 0:
                    bus.publish(ev.METRIC, {"metrics": {"val_loss": 1.0 / (step + 1)}, "stage": "val"}, step, 0)
            bus.publish(ev.STATE, {"state": "finished", "error": None})
            got = []
            for kind, item in stream:
                assert kind == "event"
                got.append(item)
                if item.kind == ev.STATE:
                    break
    finally:
        bus.close()
    seqs = [e.seq for e in got]
    assert seqs == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(got)))
    assert [e.step for e in got if e.kind == ev.LR] == list(range(300))
    on_disk = read_events(tmp_path / "events.jsonl")
    assert [e.seq for e in on_disk] == list(range(1, len(on_disk) + 1))
    assert [e.to_dict() for e in on_disk if e.seq > snap["seq"]] == [e.to_dict() for e in got]


def test_late_subscriber_gets_bounded_snapshot_then_a_gap_free_stream(rt: Path, tmp_path: Path) -> None:
    bus = make_bus(rt, tmp_path, heartbeat_s=60, history_points=64)
    try:
        bus.publish(ev.STATE, {"state": "training", "error": None})
        bus.publish(ev.SCHEDULE, {"phases": [{"index": 0, "state": "current"}], "depth": 0, "max_depth": 1})
        for step in range(1000):
            bus.publish(ev.LR, {"lrs": {"a": float(step), "b": 2.0 * step}}, step, 0)
            bus.publish(ev.METRIC, {"metrics": {"train_loss": 1.0 / (step + 1)}, "stage": "train"}, step, 0)
        bus.publish(ev.EDIT, {"edit": {"id": "e1", "phase": 1, "status": "queued"}})
        bus.publish(ev.LOG, {"level": "warning", "message": "careful"})
        wait_for(lambda: drained(bus, 2004))
        with Follower(*bus.endpoints) as follower:
            stream = follower.follow(timeout=2.0)
            kind, snap = next(stream)
            assert kind == "snapshot"
            assert snap["seq"] == bus.seq and snap["state"] == "training"
            assert snap["schedule"]["depth"] == 0
            assert [e["id"] for e in snap["edits"]] == ["e1"]
            assert snap["logs"][-1]["message"] == "careful"
            for tag in ("a", "b"):
                points = snap["lr"][tag]
                assert len(points) <= 65  # bounded: history_points plus the newest point
                assert points[0][0] == 0 and points[-1][0] == 999  # first and latest steps kept
            assert snap["metrics"]["train_loss"]["points"][-1][0] == 999
            for step in range(1000, 1100):
                bus.publish(ev.LR, {"lrs": {"a": float(step)}}, step, 1)
            steps = []
            for kind, item in stream:
                assert kind == "event"
                if item.kind == ev.LR:
                    steps.append(item.step)
                if len(steps) == 100:
                    break
            assert steps == list(range(1000, 1100))
            assert follower.tracker.gaps == 0
    finally:
        bus.close()


def test_malformed_requests_get_errors_and_the_bus_keeps_serving(rt: Path, tmp_path: Path) -> None:
    bus = make_bus(rt, tmp_path, heartbeat_s=60)

    def boom(args: dict) -> None:
        raise RuntimeError("handler exploded")

    def refuse(args: dict) -> None:
        raise OpError("no such edit")

    bus.register("cancel_edit", refuse, ("edit_id",))
    bus.register("list_edits", boom)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(bus.endpoints[1])

        def ask(*frames: bytes) -> dict:
            dealer.send_multipart(list(frames))
            assert dealer.poll(3000), "no reply"
            return json.loads(dealer.recv())

        assert ask(b"{not json")["ok"] is False
        unknown = ask(ev.dumps({"id": 1, "op": "rm -rf"}))
        assert "unknown op" in unknown["error"] and unknown["id"] == 1  # the id, once read, goes back
        assert ask(ev.dumps({"id": [1], "op": "hello"}))["ok"] is False
        assert ask(ev.dumps({"id": 2, "op": 7})) == {"id": 2, "ok": False, "error": "request needs an `op` string"}
        assert ask(ev.dumps([1, 2, 3]))["ok"] is False
        assert ask(b"\xff\xfe")["ok"] is False
        assert "exactly one JSON frame" in ask(b"a", b"b", b"c")["error"]
        reply = ask(ev.dumps({"id": "x", "op": "cancel_edit", "edit_id": "e9"}))
        assert reply == {"id": "x", "ok": False, "error": "no such edit"}
        assert "handler exploded" in ask(ev.dumps({"id": 3, "op": "list_edits"}))["error"]
        assert "not available" in ask(ev.dumps({"id": 4, "op": "stop"}))["error"]
        assert "unknown argument 'edit'" in ask(ev.dumps({"id": 5, "op": "cancel_edit", "edit": "e1"}))["error"]
        assert ask(ev.dumps({"id": 6, "op": "hello", "client": "tui"}))["ok"] is True
        # a frame beyond the size limit is never read: ZeroMQ drops that peer, others are unaffected
        big = ctx.socket(zmq.DEALER)
        big.connect(bus.endpoints[1])
        big.send(b"x" * (ev.MAX_REQUEST_BYTES + 10_000))
        assert not big.poll(500)
        big.close(0)
        # REQ clients (lockstep) are answered too
        req = ctx.socket(zmq.REQ)
        req.connect(bus.endpoints[1])
        req.send(ev.request("hello", 5))
        assert req.poll(3000)
        assert json.loads(req.recv())["result"]["run"] == "t"
        req.close(0)
        assert ask(ev.request("hello", 6))["result"]["daemon"] == bus.daemon
        dealer.close(0)
        before = bus.seq
        bus.publish(ev.LOG, {"level": "info", "message": "still alive"})
        wait_for(lambda: bus.seq > before)
    finally:
        ctx.term()
        bus.close()


def test_full_queue_drops_only_lossy_events_and_leaves_a_seq_gap(rt: Path, tmp_path: Path) -> None:
    cfg = BusConfig(run="t", pub=f"ipc://{rt}/q.pub", ctl=f"ipc://{rt}/q.ctl", events_path=tmp_path / "events.jsonl",
                    queue_limit=10, heartbeat_s=60)
    bus = EventBus(cfg)  # not started yet: nothing drains, so the queue fills
    accepted = [bus.publish(ev.LR, {"lrs": {"a": 1.0}}, i) for i in range(25)]
    assert accepted.count(True) == 10 and bus.dropped == 15
    assert bus.publish(ev.STATE, {"state": "training", "error": None})  # rare kinds are never dropped
    bus.start()
    bus.close()
    events = read_events(tmp_path / "events.jsonl")
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[-1] - len(seqs) == 15  # the dropped events' numbers were skipped: subscribers see the gap
    assert any(e.kind == ev.LOG and "15 lr/metric events dropped" in e.data["message"] for e in events)
    assert events[-1].kind == ev.STATE


def test_slow_subscriber_detects_the_gap_and_resnapshots(rt: Path, tmp_path: Path) -> None:
    bus = make_bus(rt, tmp_path, heartbeat_s=60, sndhwm=50)
    try:
        with Follower(*bus.endpoints, rcvhwm=50) as follower:
            stream = follower.follow(timeout=2.0)
            assert next(stream)[0] == "snapshot"
            for step in range(20000):  # nobody reads meanwhile: PUB and SUB queues overflow
                bus.publish(ev.LR, {"lrs": {"a": float(step)}}, step)
            wait_for(lambda: drained(bus, 20000), timeout=60)
            bus.publish(ev.STATE, {"state": "finished", "error": None})
            kinds = []
            for kind, item in stream:
                kinds.append(kind)
                if kind == "event" and item.kind == ev.STATE:
                    break
            assert follower.tracker.gaps >= 1 and kinds.count("snapshot") >= 1
            assert follower.snapshots >= 2
    finally:
        bus.close()


def test_clone_tracker_rules() -> None:
    def event(seq: int, daemon: str = "d1") -> ev.Event:
        return ev.Event(kind=ev.LR, seq=seq, ts=0.0, run="r", daemon=daemon)

    t = CloneTracker()
    assert t.on_event(event(5)) == t.BUFFER
    assert t.on_event(event(7)) == t.BUFFER
    assert [e.seq for e in t.on_snapshot({"seq": 6, "daemon": "d1"})] == [7]
    assert t.on_event(event(7)) == t.SKIP
    assert t.on_event(event(8)) == t.APPLY
    assert t.on_event(event(10)) == t.RESNAPSHOT and t.seq is None
    t.on_snapshot({"seq": 10, "daemon": "d1"})
    assert t.on_event(event(11, "d2")) == t.RESNAPSHOT  # a restarted daemon numbers from 1 again


def test_heartbeat_when_idle_and_hello(rt: Path, tmp_path: Path) -> None:
    bus = make_bus(rt, tmp_path, heartbeat_s=0.05, info={"pid": 1234, "run_dir": "/x"})
    try:
        with Control(bus.endpoints[1]) as ctl:
            wait_for(lambda: any(e.kind == ev.HEARTBEAT for e in read_events(tmp_path / "events.jsonl")))
            hello = ctl.request("hello")
        assert hello["pid"] == 1234 and hello["protocol"] == ev.PROTOCOL_VERSION and hello["codec"] == "json"
        assert {"hello", "snapshot"} <= set(hello["ops"])
    finally:
        bus.close()


def test_tcp_port_zero_binds_loopback(tmp_path: Path) -> None:
    bus = EventBus(BusConfig(run="t", pub="tcp://127.0.0.1:0", ctl="tcp://127.0.0.1:0"))
    pub, ctl = bus.start()
    try:
        assert pub.startswith("tcp://127.0.0.1:") and not pub.endswith(":0") and pub != ctl
        with Control(ctl) as c:
            assert c.request("hello")["pub"] == pub
    finally:
        bus.close()


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:1"])
def test_non_loopback_needs_curve(endpoint: str) -> None:
    with pytest.raises(BindRefused, match="without CURVE"):
        check_endpoint(endpoint, None)
    bus = EventBus(BusConfig(run="t", pub=endpoint, ctl="tcp://127.0.0.1:0"))
    with pytest.raises(BindRefused):
        bus.start()


@pytest.mark.parametrize("endpoint", ["pgm://x", "udp://1.2.3.4:5", "nonsense"])
def test_unknown_transports_refused(endpoint: str) -> None:
    with pytest.raises(BindRefused, match="only ipc"):
        check_endpoint(endpoint, None)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_admits_only_authorized_clients(tmp_path: Path) -> None:
    import zmq.auth

    keys = tmp_path / "curve"
    (keys / "authorized_clients").mkdir(parents=True)
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(keys / "authorized_clients", "client")
    zmq.auth.create_certificates(tmp_path, "stranger")
    curve = CurveKeys.from_dir(keys)
    assert check_endpoint("tcp://0.0.0.0:5555", curve) == "tcp://0.0.0.0:5555"  # allowed with CURVE
    bus = EventBus(BusConfig(run="t", pub="tcp://127.0.0.1:0", ctl="tcp://127.0.0.1:0", curve=curve))
    pub, ctl = bus.start()
    try:
        cpub, csec = zmq.auth.load_certificate(keys / "authorized_clients" / "client.key_secret")
        good = CurveClientKeys(server_public=curve.public, public=cpub, secret=csec)
        with Control(ctl, curve=good) as c:
            assert c.request("hello")["run"] == "t"
        spub, ssec = zmq.auth.load_certificate(tmp_path / "stranger.key_secret")
        bad = CurveClientKeys(server_public=curve.public, public=spub, secret=ssec)
        with Control(ctl, timeout=0.5, curve=bad) as c, pytest.raises(ControlError, match="no reply"):
            c.request("hello")
        with Control(ctl, timeout=0.5) as c, pytest.raises(ControlError, match="no reply"):  # plain text client
            c.request("hello")
    finally:
        bus.close()


@given(
    st.integers(min_value=8, max_value=60),
    st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), max_size=3000),
)
def test_downsampler_is_bounded_keeps_newest_and_extremes(max_points: int, ys: list[float]) -> None:
    d = Downsampler(max_points)
    for i, y in enumerate(ys):
        d.add((i, y))
    values = d.values()
    assert len(values) <= max_points + 1
    if ys:
        assert values[-1] == (len(ys) - 1, ys[-1])
        steps = [p[0] for p in values]
        assert steps == sorted(set(steps))
        kept = [p[1] for p in values]
        assert min(kept) == min(ys) and max(kept) == max(ys)  # min/max per bucket: the extremes always survive


def _reference_extremes(points: list) -> list:
    """The lowest and highest point by a key that puts None and NaN last (what ``_extremes`` must pick)."""
    from fts_daemon.history import _high, _low

    if len(points) <= 2:
        return list(points)
    lo = min(range(len(points)), key=lambda i: _low(points[i]))
    hi = max(range(len(points)), key=lambda i: _high(points[i]))
    if lo == hi:
        lo, hi = 0, len(points) - 1
    return [points[lo], points[hi]] if lo < hi else [points[hi], points[lo]]


@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**1030), 2**1030),
                          st.none(), st.sampled_from([0.0, 1.0, -1.0])), max_size=40))
def test_extremes_short_path_picks_what_the_key_functions_pick(values: list) -> None:
    from fts_daemon.history import _extremes

    points = [(i, v) for i, v in enumerate(values)]
    assert _extremes(points) == _reference_extremes(points)


class _GeneralPathHistory(RunHistory):
    """``ingest_lr`` without its short path: every tag looked up and checked for a rewind on every event."""

    def ingest_lr(self, step, epoch, lrs) -> None:  # type: ignore[no-untyped-def]
        if step is not None:
            self.step = step
        if epoch is not None:
            self.epoch = epoch
        for tag, value in lrs.items():
            self._series(self.lr, tag, step).add((step, value))


@given(
    st.integers(min_value=8, max_value=24),
    st.lists(
        st.one_of(
            st.tuples(st.just("lr"), st.integers(0, 2), st.floats(allow_nan=True, allow_infinity=True)),
            st.tuples(st.just("new_tags"), st.integers(0, 2), st.none()),
            st.tuples(st.just("rewind"), st.integers(0, 60), st.none()),
            st.tuples(st.just("no_step"), st.integers(0, 2), st.floats(allow_nan=False)),
            st.tuples(st.just("read"), st.just(0), st.none()),
        ),
        max_size=300,
    ),
)
@example(8, [("lr", 0, 1.0)] * 3 + [("read", 0, None), ("rewind", 2, None)] + [("lr", 0, 2.0)] * 3)  # a resume
def test_lr_history_short_path_equals_the_general_path(max_points: int, ops: list) -> None:
    """Tag sets that change (a transition adds groups), resumes that go back, events without a step: the history
    a snapshot sends is the same as when every event takes the general path, whether the events come as dicts
    (``ingest_lr``) or as the tap's rows (``ingest_lr_row``: folded in batches, here also whenever it is read)."""
    from fts_daemon import history

    fast, general = RunHistory(max_points=max_points), _GeneralPathHistory(max_points=max_points)
    rows = RunHistory(max_points=max_points)
    step, prefix = 0, "a"
    tags: dict[tuple[str, int], tuple[str, ...]] = {}  # the tap keeps one tuple object while the tags stay the same
    batch, history.ROW_BATCH = history.ROW_BATCH, 7  # folds that fall inside a run of rows
    try:
        for kind, n, value in ops:
            if kind == "rewind":
                step = max(0, step - n)
                continue
            if kind == "new_tags":
                prefix = chr(ord(prefix) + 1) if n else prefix  # a new scheduler name, or the same tags again
                tags.clear()
                continue
            if kind == "read":
                assert rows.lr.keys() == general.lr.keys()
                continue
            step += 1
            lrs = {f"{prefix}/pg{i}": value for i in range(n + 1)}
            at = None if kind == "no_step" else step
            fast.ingest_lr(at, 0, lrs)
            general.ingest_lr(at, 0, dict(lrs))
            rows.ingest_lr_row(at, 0, tags.setdefault((prefix, n), tuple(lrs)), list(lrs.values()))
    finally:
        history.ROW_BATCH = batch
    expected = json.loads(ev.dumps(general.snapshot()))
    assert json.loads(ev.dumps(fast.snapshot())) == expected
    assert json.loads(ev.dumps(rows.snapshot())) == expected
    assert (rows.step, rows.epoch) == (general.step, general.epoch)


@given(st.integers(min_value=8, max_value=24), st.lists(st.integers(0, 40), max_size=40))
def test_downsampler_extend_equals_one_add_per_point(max_points: int, chunks: list[int]) -> None:
    from fts_daemon.history import Downsampler

    one, many = Downsampler(max_points), Downsampler(max_points)
    step = 0
    for size in chunks:
        points = [(step + i, math.sin(step + i)) for i in range(size)]
        step += size
        for point in points:
            one.add(point)
        many.extend(points)
        assert (many.points, many.pending, many.stride, many.count, many.last) == (
            one.points, one.pending, one.stride, one.count, one.last)


def test_downsampled_lr_history_keeps_every_reset() -> None:
    """StepLR-like decay restarted by a reinitialization every 700 steps: each restart's peak is in the snapshot."""
    history = RunHistory(max_points=100)
    resets, lrs = {}, []
    for step in range(10_000):
        cycle, k = divmod(step, 700)
        lr = (1e-3 / (cycle + 1)) * 0.99**k
        lrs.append(lr)
        if k == 0:
            resets[step] = lr
        history.ingest(ev.Event(kind=ev.LR, seq=step + 1, ts=0.0, run="r", daemon="d", data={"lrs": {"lr": lr}},
                                step=step))
    points = history.snapshot()["lr"]["lr"]
    assert len(points) <= 101
    kept = set(points)
    assert all((step, lr) in kept for step, lr in resets.items())
    assert min(p[1] for p in points) == min(lrs) and points[-1] == (9_999, lrs[-1])


def test_an_event_after_a_quiet_spell_is_sent_at_once(rt: Path, tmp_path: Path) -> None:
    """The sleeping I/O thread is woken by the publish (poll_ms is a long 2 s here: a timer would be too late)."""
    import statistics
    import time

    bus = make_bus(rt, tmp_path, heartbeat_s=60, poll_ms=2000, batch_ms=10)
    try:
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(bus.endpoints[0])
        wait_for(lambda: bus.publish(ev.LOG, {"level": "info", "message": "hi"}) and sub.poll(50))
        while sub.poll(0):
            sub.recv_multipart()
        lags, replies = [], []
        for step in range(5):
            time.sleep(0.2)  # the I/O thread is asleep again
            bus.publish(ev.LR, {"lrs": {"lr": 0.1}}, step, 0)
            assert sub.poll(1000)
            got = ev.decode_event(sub.recv_multipart())
            lags.append(time.time() - got.ts)
            with Control(bus.endpoints[1]) as c:
                t = time.perf_counter()
                c.request("hello")
                replies.append(time.perf_counter() - t)
        sub.close(0)
    finally:
        bus.close()
    assert statistics.median(lags) < 0.1 and statistics.median(replies) < 0.1, (lags, replies)


def test_a_fast_stream_goes_out_in_batches_batch_ms_apart(rt: Path, tmp_path: Path) -> None:
    """Events published every 5 ms reach a subscriber in bursts about ``batch_ms`` (default 100) apart, none later
    than one batch, none lost: the I/O thread and the subscriber wake ~10 times a second, not 200."""
    import time

    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    assert bus.config.batch_ms == 100.0
    try:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, ev.TOPIC_PREFIX.encode())
        sub.connect(bus.endpoints[0])
        wait_for(lambda: bus.publish(ev.LOG, {"level": "info", "message": "hi"}) and sub.poll(50))
        while sub.poll(200):
            sub.recv_multipart()
        arrivals: list[tuple[float, float]] = []  # (received, published)
        start = time.monotonic()
        for step in range(200):
            time.sleep(max(0.0, start + step * 0.005 - time.monotonic()))
            bus.publish(ev.LR, {"lrs": {"lr": 0.1}}, step, 0)
            while sub.poll(0):
                arrivals.append((time.time(), ev.decode_event(sub.recv_multipart()).ts))
        while len(arrivals) < 200 and sub.poll(1000):
            arrivals.append((time.time(), ev.decode_event(sub.recv_multipart()).ts))
        sub.close(0)
    finally:
        bus.close()
    assert len(arrivals) == 200
    bursts = 1 + sum(b[0] - a[0] > 0.04 for a, b in zip(arrivals, arrivals[1:]))
    lags = sorted(got - sent for got, sent in arrivals)
    # ~1 s of events: ~10 bursts (a loaded machine may stretch a batch, never split one into many)
    assert 4 <= bursts <= 14, bursts
    assert lags[len(lags) // 2] < 0.1 and lags[-1] < 0.5, lags[-5:]


@given(
    st.integers(min_value=8, max_value=40),
    st.lists(
        st.one_of(
            st.tuples(st.just("lr"), st.integers(0, 3), st.floats(allow_infinity=True, allow_nan=True)),
            st.tuples(st.just("metric"), st.integers(0, 3), st.floats(allow_infinity=True, allow_nan=True)),
            st.tuples(st.just("rewind"), st.integers(0, 40), st.none()),
            st.tuples(st.just("snapshot"), st.none(), st.none()),
        ),
        max_size=400,
    ),
)
def test_incremental_snapshot_json_equals_encoding_the_snapshot(max_points: int, ops: list) -> None:
    """What a late subscriber receives is exactly what encoding the whole snapshot gives, however the series
    were compacted, rewound (a resume), or snapshotted in between (the cache of already-encoded points)."""
    history = RunHistory(max_points=max_points)
    step, seq = 0, 0
    hello = {"run": "r", "phase": -1, "stats": {"published": 3}}
    for kind, a, value in ops:
        seq += 1
        if kind == "rewind":
            step = max(0, step - a)  # a resumed run repeats steps from an earlier checkpoint
            continue
        if kind == "snapshot":
            assert json.loads(history.snapshot_json(hello)) == json.loads(ev.dumps({**hello, **history.snapshot()}))
            assert packed_as_lists(json.loads(history.snapshot_json(hello, "packed"))) == json.loads(
                history.snapshot_json(hello))
            continue
        step += 1
        if kind == "lr":
            data = {"lrs": {f"g/pg{i}": value for i in range(a + 1)}}
        else:
            data = {"metrics": {f"m{a}": value}, "stage": "val" if a == 3 else "train"}
        history.ingest(ev.Event(kind=kind, seq=seq, ts=0.0, run="r", daemon="d", data=data, step=step, epoch=step // 7))
    raw = history.snapshot_json(hello)
    assert json.loads(raw) == json.loads(ev.dumps({**hello, **history.snapshot()}))
    assert json.loads(raw)["phase"] == history.phase  # the history's own fields win over hello's, as before
    packed = history.snapshot_json(hello, "packed")
    assert json.loads(packed) == json.loads(ev.dumps({**hello, **history.snapshot("packed")}))
    assert packed_as_lists(json.loads(packed)) == json.loads(raw)


def packed_as_lists(snap: dict) -> dict:
    """A ``series: "packed"`` snapshot written in the list form (NaN back to null), to compare with one."""

    def num(x: float) -> float | None:
        return None if math.isnan(x) else x

    out = dict(ev.unpack_snapshot_series(snap))
    assert out.pop("series") == "packed"
    out["lr"] = {tag: [[num(s), num(v)] for s, v in zip(c["steps"], c["values"])] for tag, c in out["lr"].items()}
    out["metrics"] = {
        name: {"stage": c["stage"], "points": [[num(s), num(e), num(v)] for s, e, v in zip(c["steps"], c["epochs"], c["values"])]}
        for name, c in out["metrics"].items()
    }
    return out


@pytest.mark.parametrize("seed", range(4))
def test_incremental_snapshot_json_across_compactions_and_resumes(seed: int) -> None:
    """Long runs with snapshots between compactions (the cached points must be dropped when they are rewritten)."""
    rng = random.Random(seed)
    history = RunHistory(max_points=16)
    step = 0
    for seq in range(1, 3000):
        if rng.random() < 0.003:
            step = max(0, step - rng.randint(1, 200))  # a resume from an earlier checkpoint
        step += 1
        value = rng.choice([rng.random(), rng.random(), math.nan, math.inf])
        history.ingest(ev.Event(kind=ev.LR, seq=seq, ts=0.0, run="r", daemon="d",
                                data={"lrs": {"a/pg1": value, "a/pg2": value / 2}}, step=step, epoch=step // 50))
        if seq % 3 == 0:
            history.ingest(ev.Event(kind=ev.METRIC, seq=seq, ts=0.0, run="r", daemon="d",
                                    data={"metrics": {"loss": value}, "stage": "train"}, step=step, epoch=step // 50))
        if rng.random() < 0.1:
            assert json.loads(history.snapshot_json()) == json.loads(ev.dumps(history.snapshot())), seq
        if rng.random() < 0.1:  # packed columns are cached too: interleaved differently with compactions
            assert packed_as_lists(json.loads(history.snapshot_json(series="packed"))) == json.loads(
                history.snapshot_json()), seq


def test_packed_snapshot_over_the_socket(rt: Path, tmp_path: Path) -> None:
    """``snapshot`` with ``series: "packed"``: the same points as the list form, as float64 columns; a bad
    ``series`` gets a one-line error naming it, and the bus keeps serving."""
    bus = make_bus(rt, tmp_path, heartbeat_s=60, history_points=1000)  # every point kept (the NaN one too)
    try:
        for step in range(500):
            bus.publish(ev.LR, {"lrs": {"a/pg1": 1e-3 / (step + 1), "a/pg2": math.nan if step == 7 else 2e-3}}, step, 0)
            bus.publish(ev.METRIC, {"metrics": {"train_loss": 1.0 / (step + 1)}, "stage": "train"}, step, step // 100)
        wait_for(lambda: drained(bus, 1000))
        with Control(bus.endpoints[1]) as ctl:
            assert ctl.request("hello")["snapshot_series"] == ["lists", "packed"]
            lists = ctl.request("snapshot")
            packed = ctl.request("snapshot", series="packed")
            assert "series" not in lists and packed["series"] == "packed"
            assert all(set(c) == {"steps", "values"} for c in packed["lr"].values())
            # stats: counters, and the I/O thread's CPU time, which grows by the time the second reply is built
            assert lists.pop("stats")["io_cpu_s"] <= packed.pop("stats")["io_cpu_s"]
            assert packed_as_lists(packed) == lists
            for bad in ("columns", 1, None, ["packed"]):
                with pytest.raises(ControlError, match=r"^snapshot: series must be one of lists, packed; got"):
                    ctl.request("snapshot", series=bad)
            with pytest.raises(ControlError, match="unknown argument 'format'"):
                ctl.request("snapshot", format="packed")
        with Follower(*bus.endpoints, series="packed") as follower:
            kind, snap = next(follower.follow(timeout=2.0))
            assert kind == "snapshot"
            steps, values = snap["lr"]["a/pg2"]["steps"], snap["lr"]["a/pg2"]["values"]
            assert isinstance(values, array) and list(steps) == list(range(500))
            assert [s for s, v in zip(steps, values) if math.isnan(v)] == [7.0]  # null in the list form
            assert snap["metrics"]["train_loss"]["epochs"][-1] == 4.0
    finally:
        bus.close()


@pytest.mark.parametrize("value", [math.pi, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, 123456789.0])
def test_packed_columns_round_trip_exactly(value: float) -> None:
    text = ev.pack_floats([value, None, math.inf, -math.inf, math.nan, 3])
    assert len(text) == 6 * 16 and text == text.lower()
    back = ev.unpack_floats(text, "x")
    assert back[0] == value and str(back[0]) == str(value) and back[5] == 3.0
    assert all(math.isnan(x) for x in back[1:5])  # the list form's null


def test_state_edit_and_transition_events_reach_the_file_at_once(rt: Path, tmp_path: Path) -> None:
    """A daemon killed right after such an event still has it in events.jsonl (the rest is flushed every 0.1 s)."""
    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    try:
        path = tmp_path / "events.jsonl"
        for kind, data in ((ev.STATE, {"state": "training", "error": None}),
                           (ev.EDIT, {"edit": {"id": "e1", "phase": 2, "status": "queued"}}),
                           (ev.TRANSITION, {"from": 0, "to": 1, "reason": "epoch_limit"})):
            before = bus.published
            bus.publish(kind, data, 5, 1)
            wait_for(lambda before=before: bus.published > before, timeout=5)
            # no sleep: published counts after the write, and these kinds are written through before it
            last = path.read_text(encoding="utf-8").splitlines()[-1]
            assert json.loads(last)["kind"] == kind
    finally:
        bus.close()


@given(st.tuples(st.integers(-(2**70), 2**70) | st.none(),
                 st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.none(),
                 st.floats(width=32) | st.booleans() | st.text(max_size=3)))
def test_point_encoding_is_the_json_modules(point: tuple) -> None:
    from fts_daemon.history import _point_json

    expected = ev.dumps(point)  # NaN/inf become null there too
    assert _point_json(point) == expected
    assert _point_json(point[:2]) == ev.dumps(point[:2])


@given(
    st.dictionaries(st.text(max_size=12), st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                    st.integers(-(2**70), 2**70), st.none()), max_size=8),
    st.integers(0, 2**40),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 2**40)),
    st.one_of(st.none(), st.integers(0, 2**40)),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.text(max_size=10),
)
def test_lr_encoder_writes_exactly_what_the_general_encoder_writes(
    lrs: dict, seq: int, ts: float, step: int | None, epoch: int | None, run: str
) -> None:
    """The bus's short path for lr events must not change a byte of the wire or of events.jsonl."""
    event = ev.Event(kind=ev.LR, seq=seq, ts=ts, run=run, daemon="d0", data={"lrs": lrs}, step=step, epoch=epoch)
    assert ev.StepEncoder(run, "d0").lr(seq, ts, lrs, step, epoch) == ev.encode_event(event)[1]


@given(
    st.dictionaries(st.text(max_size=12), st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                    st.integers(-(2**70), 2**70), st.none()), max_size=8),
    st.text(max_size=8),
    st.integers(0, 2**40),
    st.one_of(st.none(), st.integers(0, 2**40)),
)
def test_metric_encoder_writes_exactly_what_the_general_encoder_writes(
    metrics: dict, stage: str, seq: int, step: int | None
) -> None:
    data = {"metrics": metrics, "stage": stage}
    event = ev.Event(kind=ev.METRIC, seq=seq, ts=1.5, run="r", daemon="d0", data=data, step=step, epoch=3)
    assert ev.StepEncoder("r", "d0").metric(seq, 1.5, metrics, stage, step, 3) == ev.encode_event(event)[1]


@given(
    st.lists(st.text(max_size=12), max_size=8),
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans()),
             max_size=8),
    st.integers(0, 2**40),
    st.one_of(st.none(), st.integers(0, 2**40)),
)
@example(["a", "b"], [1.5e308, 1.5e308], 1, 2)  # finite values whose sum is not
def test_lr_row_encoder_writes_what_the_general_encoder_writes_or_steps_aside(
    tags: list, values: list, seq: int, step: int | None
) -> None:
    """Finite floats under distinct tags: the general encoder's bytes. Anything else: None (the general path)."""
    encoder = ev.StepEncoder("r", "d0")
    values = values[: len(tags)]
    body = encoder.lr_row(seq, 2.5, tuple(tags), values, step, 1)
    plain = (len(set(tags)) == len(tags) == len(values)
             and all(type(v) is float and math.isfinite(v) for v in values))
    if not plain:
        assert body is None
        return
    event = ev.Event(kind=ev.LR, seq=seq, ts=2.5, run="r", daemon="d0", data={"lrs": dict(zip(tags, values))},
                     step=step, epoch=1)
    assert body == ev.encode_event(event)[1]
    assert encoder.lr_row(seq, 2.5, tuple(tags), values, step, 1) == body  # the cached names give the same


@pytest.mark.parametrize("value", [True, "1e-3", [1.0], {"a": 1}])
def test_lr_encoder_leaves_other_values_to_the_general_path(rt: Path, tmp_path: Path, value: object) -> None:
    assert ev.StepEncoder("r", "d").lr(1, 0.0, {"g/pg1": 1.0, "g/pg2": value}, 3, 0) is None
    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    try:
        bus.publish(ev.LR, {"lrs": {"g/pg1": 1.0, "g/pg2": value}}, 3, 0)
        bus.publish(ev.LR, {"lrs": {"g/pg1": 0.5}}, 4, 0)
        wait_for(lambda: drained(bus, 2), timeout=5)
    finally:
        bus.close()
    first, second = read_events(tmp_path / "events.jsonl")
    assert first.data == {"lrs": {"g/pg1": 1.0, "g/pg2": value}} and (first.seq, first.step) == (1, 3)
    assert second.data == {"lrs": {"g/pg1": 0.5}} and (second.seq, second.step) == (2, 4)
    assert bus.history.lr["g/pg1"].values() == [(3, 1.0), (4, 0.5)]


@pytest.mark.parametrize("watching", [False, True])
def test_lr_rows_arrive_as_lr_events(rt: Path, tmp_path: Path, watching: bool) -> None:
    """``publish_lr`` (the tap's call): on the wire and in the record as ``lr`` events, whichever path encodes them
    (a watcher of lr events, or a value that is not a float, takes the general one), in the history, and dropped
    and counted when the queue is full."""
    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    seen: list[ev.Event] = []
    if watching:
        bus.watch(seen.append, (ev.LR,))
    tags = ("g/pg1", "g/pg2")
    try:
        assert bus.publish_lr(tags, [1.0, 0.5], 3, 0)
        assert bus.publish_lr(tags, [2, 0.25], 4, 0)  # an int: the general path writes it as the json module does
        assert bus.publish_lr(tags, [0.5, 0.125], 5, 1)
        wait_for(lambda: drained(bus, 3), timeout=5)
    finally:
        bus.close()
    events = read_events(tmp_path / "events.jsonl")
    assert [(e.kind, e.seq, e.step, e.epoch, e.data) for e in events] == [
        (ev.LR, 1, 3, 0, {"lrs": {"g/pg1": 1.0, "g/pg2": 0.5}}),
        (ev.LR, 2, 4, 0, {"lrs": {"g/pg1": 2, "g/pg2": 0.25}}),
        (ev.LR, 3, 5, 1, {"lrs": {"g/pg1": 0.5, "g/pg2": 0.125}}),
    ]
    assert [e.data for e in seen] == ([e.data for e in events] if watching else [])
    assert bus.history.lr["g/pg2"].values() == [(3, 0.5), (4, 0.25), (5, 0.125)]
    assert (bus.history.step, bus.history.epoch) == (5, 1)

    full = EventBus(BusConfig(run="t", pub=f"ipc://{rt}/f.pub", ctl=f"ipc://{rt}/f.ctl", queue_limit=1))
    # not started: nothing drains the queue
    assert full.publish_lr(tags, [1.0, 0.5], 1, 0) and not full.publish_lr(tags, [1.0, 0.5], 2, 0)
    assert full.dropped == 1


def test_watchers_see_the_kinds_they_asked_for(rt: Path, tmp_path: Path) -> None:
    """A watcher of every kind sees lr events too (the lr short path steps aside for it)."""
    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    seen_all: list[str] = []
    seen_state: list[str] = []
    bus.watch(lambda e: seen_all.append(e.kind))
    bus.watch(lambda e: seen_state.append(e.kind), (ev.STATE,))
    try:
        bus.publish(ev.LR, {"lrs": {"g": 1.0}}, 0, 0)
        bus.publish(ev.STATE, {"state": "training", "error": None})
        bus.publish(ev.LR, {"lrs": {"g": 0.5}}, 1, 0)
        wait_for(lambda: drained(bus, 3), timeout=5)
    finally:
        bus.close()
    assert seen_all == [ev.LR, ev.STATE, ev.LR] and seen_state == [ev.STATE]


def test_a_slow_op_runs_beside_the_stream_and_other_requests(rt: Path, tmp_path: Path) -> None:
    import threading

    from fts_daemon.bus import MAX_SLOW_PENDING

    bus = make_bus(rt, tmp_path, heartbeat_s=60)
    release = threading.Event()
    started = threading.Event()

    def plan(args: dict) -> dict:
        started.set()
        if not release.wait(20):
            raise OpError("never released")
        if args.get("phase") == -1:
            raise OpError("phase -1 is not a phase")
        return {"phase": args.get("phase")}

    bus.register("plan", plan, ("phase",), slow=True)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(bus.endpoints[1])

        def reply() -> dict:
            assert dealer.poll(5000), "no reply"
            return json.loads(dealer.recv())

        dealer.send(ev.request("plan", "p1", phase=2))
        assert started.wait(5)
        # while the slow op runs: hello is answered, events go out, a bad argument is refused at once
        dealer.send(ev.request("hello", "h1"))
        assert reply()["id"] == "h1"
        dealer.send(ev.request("plan", "bad", phases=1))
        assert "unknown argument 'phases'" in reply()["error"]
        before = bus.seq
        bus.publish(ev.LOG, {"level": "info", "message": "still flowing"})
        wait_for(lambda: bus.seq > before)
        # MAX_SLOW_PENDING requests wait their turn behind the one being answered; the next is refused as busy
        for i in range(MAX_SLOW_PENDING + 1):
            dealer.send(ev.request("plan", f"q{i}", phase=-1 if i == 0 else i))
        busy = reply()
        assert busy["id"] == f"q{MAX_SLOW_PENDING}" and busy["ok"] is False and busy["error"].startswith("busy:")
        release.set()
        answers = {r["id"]: r for r in (reply() for _ in range(MAX_SLOW_PENDING + 1))}
        assert answers["p1"] == {"id": "p1", "ok": True, "result": {"phase": 2}}
        assert answers["q0"] == {"id": "q0", "ok": False, "error": "phase -1 is not a phase"}
        assert sorted(answers) == ["p1", *(f"q{i}" for i in range(MAX_SLOW_PENDING))]
        assert all(answers[f"q{i}"]["result"] == {"phase": i} for i in range(1, MAX_SLOW_PENDING))
        # answered, the worker takes new requests again
        dealer.send(ev.request("plan", "again", phase=7))
        assert reply() == {"id": "again", "ok": True, "result": {"phase": 7}}
        dealer.close(0)
    finally:
        release.set()
        ctx.destroy(linger=0)
        bus.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@given(
    _json_values,
    st.sampled_from([(",", ":"), (", ", ": ")]),
    st.sampled_from(["", " ", "\n", "\ufeff"]),
    st.sampled_from(["", " ", "\n", "x", "}", "{}"]),
    st.integers(0, 40),
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "str"]),
)
@example(None, (",", ":"), "", "", 40, "utf-8").via("an empty frame")
def test_loads_reads_and_refuses_exactly_what_json_loads_does(
    value: object, separators: tuple[str, str], before: str, after: str, cut: int, encoding: str
) -> None:
    """events.loads' short path (the C scanner, for compact UTF-8 bodies) must not change what a frame decodes to,
    nor which frames are refused: whitespace, BOMs, other encodings, truncation and trailing bytes included."""
    text = before + json.dumps(value, separators=separators) + after
    text = text[: max(0, len(text) - cut)] if cut < 40 else ""
    raw: bytes | str = text if encoding == "str" else text.encode(encoding)

    def outcome(decode: object) -> tuple[str, str]:
        try:
            return "ok", json.dumps(decode(raw))  # type: ignore[operator]
        except (ValueError, ev.ProtocolError):
            return "refused", ""

    assert outcome(ev.loads) == outcome(json.loads)


def test_what_an_op_publishes_is_recorded_before_its_reply(rt: Path, tmp_path: Path) -> None:
    """A daemon killed right after replying "queued" left no ``edit`` event in events.jsonl (found killing daemons
    in the millisecond after the reply): the event waited for the next batch, up to batch_ms later."""
    bus = make_bus(rt, tmp_path, heartbeat_s=60, batch_ms=500)

    def queue_edit(args: dict) -> dict:
        record = {"id": "e1", "phase": 2, "status": "queued"}
        bus.publish(ev.EDIT, {"edit": record})  # as the edit queue does, from the I/O thread
        return record

    bus.register("queue_edit", queue_edit, ("phase", "changes"))
    try:
        path = tmp_path / "events.jsonl"
        for i in range(20):
            bus.publish(ev.LR, {"lrs": {"pg1": 0.1}}, i, 0)  # a batch just went out: the next is batch_ms away
        wait_for(lambda: drained(bus, 20))
        with Control(bus.endpoints[1]) as ctl:
            ctl.request("queue_edit", phase=2, changes={"lr": 1.0})
            lines = path.read_text(encoding="utf-8").splitlines()  # no wait
        assert json.loads(lines[-1])["kind"] == ev.EDIT, lines[-1]
    finally:
        bus.close()
