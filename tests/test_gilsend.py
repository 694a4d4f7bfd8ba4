"""``gilsend``: events sent through libzmq without releasing the GIL arrive exactly as pyzmq would send them."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import zmq

from fts_daemon import gilsend

from .daemon_support import private_runtime_dir


@pytest.fixture
def fresh_lib(monkeypatch: pytest.MonkeyPatch):
    """Forget the loaded library before and after (FTS_GIL_SEND is read when it is first loaded)."""
    monkeypatch.setattr(gilsend, "_lib", gilsend._UNSET)
    yield
    monkeypatch.setattr(gilsend, "_lib", gilsend._UNSET)


def _round_trip(rt: Path, frames: list[tuple[bytes, bytes]]) -> list[list[bytes]]:
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        pub.setsockopt(zmq.SNDHWM, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        pub.bind(f"ipc://{rt}/g.pub")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{rt}/g.pub")
        send = gilsend.sender(pub)
        # slow joiner: send probes until one arrives, then the real messages
        while True:
            send(b"probe", b"")
            if sub.poll(50):
                while sub.poll(50):
                    sub.recv_multipart()
                break
        for topic, body in frames:
            send(topic, body)
        return [sub.recv_multipart() for _ in frames]
    finally:
        pub.close(0)
        sub.close(0)


def test_events_arrive_whole_and_in_order(monkeypatch: pytest.MonkeyPatch, fresh_lib: None) -> None:
    assert gilsend.libzmq() is not None, "pyzmq's libzmq should be reachable here (Linux, pyzmq wheel)"
    frames = [(b"fts.v1.lr", b'{"seq":%d}' % i) for i in range(500)]
    frames += [(b"fts.v1.log", b""), (b"fts.v1.state", bytes(range(256)) * 400), (b"", b"x")]
    with private_runtime_dir(monkeypatch) as rt:
        assert _round_trip(rt, frames) == [list(f) for f in frames]


def test_the_send_keeps_the_gil(fresh_lib: None) -> None:
    """ctypes releases the GIL around foreign calls unless the function comes from a PyDLL."""
    lib = gilsend.libzmq()
    assert isinstance(lib, ctypes.PyDLL)
    assert lib.zmq_send._flags_ & ctypes._FUNCFLAG_PYTHONAPI


def test_fts_gil_send_0_falls_back_to_pyzmq(monkeypatch: pytest.MonkeyPatch, fresh_lib: None) -> None:
    monkeypatch.setenv("FTS_GIL_SEND", "0")
    assert gilsend.libzmq() is None
    frames = [(b"fts.v1.lr", b'{"seq":%d}' % i) for i in range(50)]
    with private_runtime_dir(monkeypatch) as rt:
        assert _round_trip(rt, frames) == [list(f) for f in frames]


def test_a_libzmq_of_another_version_is_not_used(monkeypatch: pytest.MonkeyPatch, fresh_lib: None) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (1, 0, 0))
    assert gilsend.libzmq() is None
