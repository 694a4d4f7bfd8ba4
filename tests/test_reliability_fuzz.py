"""Property-based fuzzing of the control socket of a training daemon: more than 10,000 malformed or hostile messages.

Hypothesis generates batches of messages (random bytes, bad JSON, JSON of the wrong shape, unknown ops, wrong
argument types and names, edits that are invalid by construction -- hostile ``class_path``s such as ``os.system`` and
``builtins.eval``, regexes matching nothing or everything, NaN/negative/huge LRs --, ``stop`` with a bad ``when``,
multipart junk, deeply nested JSON, and frames over the 256 KiB limit) and sends them, pipelined, from a DEALER.
Every message must be answered (exactly one reply, which parses) or, for oversized frames only, dropped; the daemon
keeps training meanwhile (in phase 0 and 1 edits for phase 2 get the full validation, later ones the phase check).

Afterwards: no edit was accepted, nothing outside the allowed prefixes was imported (``this`` would print the Zen
of Python; an ``os.system`` sentinel file never appears), and the run, stopped at an epoch end, has exactly the LRs
and weights of the same config trained without fuzzing.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fts_daemon import events as ev
from fts_daemon.client import Control

from .daemon_support import SCHEDULE, wait_for, write_config
from .reliability_support import EVERY_EPOCH, DaemonProcess, env_for, figure, lr_steps, read_event_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES_WANTED = 10_000
EXAMPLES = 1500  # batches of 4..16 messages: about 11,300 messages
STEPS_PER_EPOCH = 20
SENTINEL = Path(f"/tmp/fts-fuzz-pwned-{uuid.uuid4().hex}")
STATS: dict[str, int] = {"messages": 0, "answered": 0, "dropped": 0, "ok": 0, "error": 0, "batches": 0}

HOSTILE_CLASSES = [
    "os.system", "builtins.eval", "builtins.exec", "builtins.__import__", "subprocess.Popen", "pickle.loads",
    "importlib.import_module", "this.Zen", "posix.system", "shutil.rmtree", "__import__('os').system",
    "torch.optim.lr_scheduler.os.system", "torch.optim.lr_scheduler.warnings.warn", "torch.optim.lr_scheduler",
    "torch.optim.Optimizer.__init__", "torch.optim.lr_scheduler.LambdaLR", "torch.optim.lr_scheduler.LRScheduler",
    "torch.load", "torch.optim.", ".", "", "torch.optim.lr_scheduler.NoSuchLR", "torch.optim.lr_scheduler.StepLR.step",
    "tests.reliability_probe.Probe",
]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=24))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(st.text(max_size=10), c, max_size=4)),
                           max_leaves=12)
bad_lrs = st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")), st.just(float("inf")), st.text(max_size=8),
                    st.booleans(), st.lists(st.floats(0, 1), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                           scalars, max_size=2))
hostile_init = st.fixed_dictionaries(
    {"class_path": st.one_of(st.sampled_from(HOSTILE_CLASSES), st.text(max_size=40))},
    optional={"init_args": st.one_of(st.just({"command": f"touch {SENTINEL}"}), json_values)},
)
invalid_changes = st.one_of(
    st.dictionaries(st.text(max_size=12).filter(lambda k: k not in ("params", "lr", "max_transition_epoch",
                                                                     "new_lr_scheduler", "new_optimizer")),
                    json_values, min_size=1, max_size=3),  # unknown keys
    # (not `[]`: an empty phase is allowed, with a warning)
    st.builds(lambda p: {"params": p}, st.sampled_from([[".*"], [""], ["model"], ["model.classifier.weight"],
                                                        ["(unclosed"], ["nothing\\.matches.*"], ["[z-a]"]])),
    st.builds(lambda p: {"params": p}, st.one_of(st.text(max_size=8), st.integers(), st.none().map(lambda _: 5))),
    st.builds(lambda v: {"lr": v}, bad_lrs),
    st.builds(lambda v: {"max_transition_epoch": v},
              st.one_of(st.integers(max_value=-2), st.text(max_size=4), st.booleans(),
                        st.floats(0.5, 9.5).filter(lambda x: not x.is_integer()))),
    st.builds(lambda v: {"new_lr_scheduler": {"lr_scheduler_init": v}}, hostile_init),
    st.builds(lambda v: {"new_optimizer": {"optimizer_init": v}}, hostile_init),
    st.builds(lambda v: {"new_lr_scheduler": {"init_pg_lrs": v}},
              st.one_of(st.lists(bad_lrs, min_size=1, max_size=6), st.just([]), st.text(max_size=5))),
    st.builds(lambda v: {"new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"T_0": v}}}},
              st.one_of(st.integers(max_value=0), st.text(max_size=4), st.floats(allow_nan=True))),
    st.builds(lambda v: {"new_lr_scheduler": {"pl_lrs_cfg": v}},
              st.dictionaries(st.sampled_from(["interval", "frequency", "bogus"]), st.sampled_from(["batch", 0, -1,
                                                                                                 "x", 2.5]),
                              min_size=1)),
    st.just({"new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"}}}),
    # huge init_pg_lrs: beyond the frame limit (under it, a too-long list is a warning, as in FTS, not an error)
    st.builds(lambda n: {"new_lr_scheduler": {"init_pg_lrs": [1e-3] * n}}, st.integers(40_000, 60_000)),
)
bad_phase = st.one_of(st.integers(-5, 0), st.integers(3, 2**40), st.text(max_size=4), st.booleans(), st.none(),
                      st.floats(), st.lists(st.integers(), max_size=2))
bad_when = json_values.filter(lambda w: w not in ("step", "epoch"))
req_ids = st.one_of(st.integers(), st.text(max_size=8), st.none(), st.floats(), st.lists(st.integers(), max_size=2),
                    st.booleans())


def obj(op: Any, req_id: Any, **args: Any) -> bytes:
    body = {"id": req_id, "op": op, **args}
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


requests = st.one_of(
    st.builds(lambda i, p, c: obj("queue_edit", i, phase=p, changes=c), req_ids, st.just(2), invalid_changes),
    st.builds(lambda i, p, c: obj("queue_edit", i, phase=p, changes=c), req_ids, bad_phase, json_values),
    st.builds(lambda i, c, extra: obj("queue_edit", i, phase=2, changes=c, **extra), req_ids, invalid_changes,
              st.dictionaries(st.sampled_from(["phase2", "change", "x", "edit_id"]), json_values, min_size=1)),
    st.builds(lambda i, e: obj("cancel_edit", i, edit_id=e), req_ids, json_values),
    st.builds(lambda i, p, s: obj("list_edits", i, phase=p, status=s), req_ids, json_values, json_values),
    st.builds(lambda i, w: obj("stop", i, when=w), req_ids, bad_when),
    st.builds(lambda i, extra: obj("stop", i, **extra), req_ids,
              st.dictionaries(st.sampled_from(["now", "force", "when_", "x"]), json_values, min_size=1)),
    st.builds(lambda i, op, extra: obj(op, i, **extra), req_ids, st.sampled_from(["hello", "snapshot"]),
              st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in ("id", "op", "client")),
                              json_values, max_size=2)),  # read-only: answered, harmless
    st.builds(lambda i, p, c, t: obj("plan", i, phase=p, changes=c, transition_epochs=t), req_ids, bad_phase,
              json_values, json_values),
    st.builds(lambda i, op, extra: obj(op, i, **extra), req_ids,
              st.one_of(st.text(max_size=30).filter(lambda op: op not in ev.OPS),
                        st.sampled_from(["__init__", "_dispatch", "register", "eval", "exec", "shutdown", "STOP",
                                         "queue-edit", "snapshot "])),
              st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("id", "op")), json_values, max_size=2)),
    st.builds(lambda i, op: obj(op, i), req_ids, json_values.filter(lambda v: not isinstance(v, str))),
)
weird_frames = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.filter(lambda v: not (isinstance(v, dict) and "op" in v)).map(
        lambda v: json.dumps(v, allow_nan=True).encode()),
    st.integers(1_000, 60_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting (under the size limit)
    st.integers(4_400, 20_000).map(lambda n: b'{"id": ' + b"9" * n + b', "op": "hello"}'),  # huge integer
    st.just(b'{"id": 1, "op": "stop", "op": "hello"}'),  # duplicate keys (JSON's last one wins: a hello)
    st.just(b'{"id": 1, "op": "stop", "when": NaN}'),
    st.just(b'\xef\xbb\xbf{"id": 1, "op": "hello"}'),  # BOM
    st.just(b'{"id": "\\ud800", "op": "hello"}'),  # lone surrogate
)
# (frames to send, oversized?); about 2% oversized (each costs a connection of its own)
regular = st.one_of(
    requests.map(lambda b: ([b], False)),
    weird_frames.map(lambda b: ([b], False)),
    st.lists(st.one_of(requests, weird_frames), min_size=2, max_size=4).map(lambda fs: (fs, False)),  # multipart
    st.one_of(requests, weird_frames).map(lambda b: ([b"", b], False)),  # a REQ-style envelope around junk
    st.one_of(requests, weird_frames).map(lambda b: ([b"", b"", b], False)),
)
oversized = st.integers(ev.MAX_REQUEST_BYTES + 2048, ev.MAX_REQUEST_BYTES + 65_536).map(
    lambda n: ([b'{"id": 1, "op": "hello", "pad": "' + b"x" * n + b'"}'], True))
messages = st.sampled_from([True] + [False] * 49).flatmap(lambda big: oversized if big else regular)


def sendable(frames: list[bytes]) -> bool:
    """ZeroMQ drops (unread) a peer whose frame exceeds the daemon's limit."""
    return all(len(f) <= ev.MAX_REQUEST_BYTES for f in frames)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("fuzz")
    runtime = base / "rt"
    runtime.mkdir(mode=0o700)
    env = env_for(runtime)
    sched = copy.deepcopy(SCHEDULE)
    sched[0]["max_transition_epoch"], sched[1]["max_transition_epoch"] = 6, 12
    cfg = write_config(base / "cfg", sched, step_delay=0.05, max_epochs=1000, num_train=32 * STEPS_PER_EPOCH,
                       name="fz")
    proc = DaemonProcess.start("fuzz", base / "fuzz", env, config=cfg, extra=EVERY_EPOCH)
    rec = proc.record()
    ctx = zmq.Context()
    with Control(rec.ctl, timeout=30) as ctl:
        wait_for(lambda: ctl.request("hello")["state"] == "training", timeout=120)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(rec.ctl)
    state = {"base": base, "env": env, "sched": sched, "proc": proc, "rec": rec, "ctx": ctx, "dealer": dealer,
             "started": time.monotonic()}
    yield state
    dealer.close(0)
    ctx.term()
    proc.ensure_dead()


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(messages, min_size=4, max_size=16))
def test_fuzz_the_control_socket(target: Any, batch: list[tuple[list[bytes], bool]]) -> None:
    dealer: zmq.Socket = target["dealer"]
    expected = 0
    for frames, too_big in batch:
        STATS["messages"] += 1
        if too_big or not sendable(frames):
            # on its own connection: ZeroMQ drops a peer that sends an oversized message, unread
            big = target["ctx"].socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(target["rec"].ctl)
            big.send_multipart(frames)
            assert not big.poll(20)
            big.close(0)
            STATS["dropped"] += 1
            continue
        dealer.send_multipart(frames)
        expected += 1
    deadline = time.monotonic() + 30
    got = 0
    while got < expected:
        assert dealer.poll(max(1, int((deadline - time.monotonic()) * 1000))), \
            f"{expected - got} of {expected} messages unanswered; daemon alive: {target['proc'].proc.poll() is None}"
        reply = json.loads(dealer.recv_multipart()[-1])
        assert set(reply) in ({"id", "ok", "result"}, {"id", "ok", "error"})
        if reply["ok"]:
            STATS["ok"] += 1
        else:
            STATS["error"] += 1
            assert isinstance(reply["error"], str) and "\n" not in reply["error"]
        got += 1
    STATS["answered"] += got
    STATS["batches"] += 1
    assert target["proc"].proc.poll() is None, "the daemon died"


def test_fuzzed_run_is_unchanged(target: Any) -> None:
    fuzz_seconds = time.monotonic() - target["started"]
    base, env, rec = target["base"], target["env"], target["rec"]
    with Control(rec.ctl, timeout=30) as ctl:
        hello = ctl.request("hello")
        edits = ctl.request("list_edits")["edits"]
        ctl.request("stop", when="epoch")
    assert hello["state"] in ("training", "transition")
    assert target["proc"].wait(120) == 0
    events = read_event_file(base / "fuzz" / "events.jsonl").events
    final = [e for e in events if e.kind == ev.STATE][-1].data
    assert final["reason"] == "stopped"
    fuzzed_ckpt = torch.load(final["checkpoint"], map_location="cpu", weights_only=False)
    epochs = int(fuzzed_ckpt["epoch"]) + 1
    rejected = sum(e.kind == ev.EDIT and e.data["edit"]["status"] == "rejected" for e in events)
    errors = [e.data["message"] for e in events if e.kind == ev.LOG and e.data["level"] == "error"]

    # the same config, never fuzzed, trained for the same number of epochs
    cfg = write_config(base / "cfg-ref", target["sched"], max_epochs=epochs, num_train=32 * STEPS_PER_EPOCH,
                       name="ref")
    ref = DaemonProcess.start("fuzzref", base / "fuzzref", env, config=cfg, extra=EVERY_EPOCH)
    assert ref.wait(300) == 0
    ref_events = read_event_file(base / "fuzzref" / "events.jsonl").events
    ref_ckpt = torch.load(base / "fuzzref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    same_lrs = lr_steps(events) == lr_steps(ref_events)
    same_weights = all(torch.equal(v, ref_ckpt["state_dict"][k]) for k, v in fuzzed_ckpt["state_dict"].items())
    zen = "Beautiful is better than ugly" in target["proc"].output()
    transitions = [e.data["to"] for e in events if e.kind == ev.TRANSITION]
    figure("control-fuzz",
           f"{STATS['messages']} hostile messages in {STATS['batches']} batches over {fuzz_seconds:.0f}s of training "
           f"(phases {[0, *transitions]}): {STATS['answered']} answered ({STATS['error']} errors, {STATS['ok']} "
           f"harmless reads), {STATS['dropped']} oversized dropped, 0 unanswered; {rejected} edits refused, "
           f"{len(edits)} accepted; LRs {'identical' if same_lrs else 'DIFFERENT'} and weights "
           f"{'bitwise identical' if same_weights else 'DIFFERENT'} to an unfuzzed run of {epochs} epochs",
           messages=STATS["messages"], same_lrs=same_lrs, same_weights=same_weights)
    assert STATS["messages"] >= MESSAGES_WANTED
    assert STATS["answered"] + STATS["dropped"] == STATS["messages"]
    assert edits == [] and not SENTINEL.exists() and not zen
    assert not errors, errors[:5]
    assert same_lrs and same_weights
