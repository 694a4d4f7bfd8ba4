"""Send ``[topic, body]`` on a ZeroMQ PUB socket without letting go of the GIL.

pyzmq releases the GIL around every ``zmq_msg_send``, twice per two-frame event. The bus's I/O thread sends one
event per training step, and each release hands the GIL to the waiting training thread and makes the I/O thread
queue up for it again: several cross-core wake-ups per event, which cost the training thread far more than the
microsecond the send takes (with no subscriber process, a tiny model's 2 ms steps on 2 vCPUs ran ~4% slower with
the stream on through pyzmq, ~1% through this path: ``bench/daemon_bench.py``, section 1b). A non-blocking send on
a PUB socket never waits (ZeroMQ drops at the high-water mark instead), so holding the GIL through it costs
nothing: this module calls ``zmq_send`` of the very libzmq pyzmq uses through ``ctypes.PyDLL``, whose calls keep
the GIL.

When that libzmq cannot be found or its version differs from pyzmq's, or ``FTS_GIL_SEND=0`` is set, :func:`sender`
falls back to pyzmq's own ``send_multipart``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

import zmq

__all__ = ["SendFrames", "libzmq", "sender"]

log = logging.getLogger("fts_daemon.gilsend")

# (topic, body) -> None; never blocks, never raises for a full queue (the frames are dropped, as PUB does)
SendFrames = Callable[[bytes, bytes], None]

_SNDMORE = 2  # ZMQ_SNDMORE
_DONTWAIT = 1  # ZMQ_DONTWAIT
_UNSET = object()
_lib: object = _UNSET


def _candidates() -> list[str]:
    """Paths of libzmq already mapped into this process (the one pyzmq's extension loaded), pyzmq's bundled copy
    first."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:  # "address perms offset dev inode path"
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/") and Path(path).name.startswith("libzmq") and path not in found:
                    found.append(path)
    except OSError:  # not Linux: look where pyzmq's wheels put it
        bundled = Path(zmq.__file__).resolve().parent.parent / "pyzmq.libs"
        found = [str(p) for p in sorted(bundled.glob("libzmq*"))]
    package = str(Path(zmq.__file__).resolve().parent.parent)
    return sorted(found, key=lambda p: not p.startswith(package))


def _load() -> ctypes.PyDLL | None:
    if os.environ.get("FTS_GIL_SEND", "1") == "0":
        return None
    want = zmq.zmq_version_info()
    for path in _candidates():
        try:
            lib = ctypes.PyDLL(path)  # already loaded: dlopen returns that copy, not a second one
            major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        except (OSError, AttributeError):
            continue
        if (major.value, minor.value, patch.value) != tuple(want):
            continue
        lib.zmq_send.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        lib.zmq_send.restype = ctypes.c_int
        return lib
    log.debug("fts: libzmq %s not reachable through ctypes; events are sent through pyzmq", zmq.zmq_version())
    return None


def libzmq() -> ctypes.PyDLL | None:
    """pyzmq's libzmq, opened so that calls keep the GIL (None where it cannot be)."""
    global _lib
    if _lib is _UNSET:
        _lib = _load()
    return _lib  # type: ignore[return-value]


def sender(socket: zmq.Socket) -> SendFrames:
    """A function that sends ``[topic, body]`` on ``socket`` (a PUB socket owned by the calling thread) without
    blocking; it keeps the GIL where :func:`libzmq` is available."""
    lib = libzmq()
    if lib is None:

        def send_pyzmq(topic: bytes, body: bytes) -> None:
            try:
                socket.send_multipart((topic, body), flags=zmq.NOBLOCK)
            except zmq.Again:  # PUB never blocks in practice; if it would, subscribers see a gap
                pass

        return send_pyzmq
    zmq_send = lib.zmq_send
    handle = ctypes.c_void_p(socket.underlying)

    def send_keeping_gil(topic: bytes, body: bytes) -> None:
        # the first frame decides for the whole message: once it is accepted, the rest always is (atomic delivery)
        if zmq_send(handle, topic, len(topic), _SNDMORE | _DONTWAIT) >= 0:
            zmq_send(handle, body, len(body), _DONTWAIT)

    return send_keeping_gil
