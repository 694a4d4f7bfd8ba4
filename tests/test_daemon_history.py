"""What a (re)attaching client learns: run facts in ``hello``, history of earlier starts after ``--resume``,
transition times, downsampled series; a saved config that resumes from anywhere; no LR keys among metrics."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pytorch_lightning.callbacks import Callback

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.bus import BusConfig, EventBus
from fts_daemon.client import Control, Follower
from fts_daemon.history import RunHistory, final_state, last_position
from fts_daemon.runner import resolve_schedule_path
from fts_tui.state import RunState
from fts_tui.views import header_lines

from .daemon_support import SCHEDULE, private_runtime_dir, read_events, start_daemon, wait_for, write_config


def event(kind: str, seq: int, data: dict, step: int | None = None, daemon: str = "old", ts: float = 100.0) -> ev.Event:
    return ev.Event(kind=kind, seq=seq, ts=ts + seq, run="r", daemon=daemon, data=data, step=step, epoch=0)


# ------------------------------------------------------------------------------------------------ units


def test_relative_schedule_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "s.yaml").write_text("0: {params: [a]}\n")
    monkeypatch.chdir(tmp_path / "cfg")  # found from the working directory: still pinned, absolute
    fts = SimpleNamespace(ft_schedule="s.yaml")
    resolve_schedule_path(fts, ["c.yaml"])
    assert fts.ft_schedule == str(tmp_path / "cfg" / "s.yaml")
    monkeypatch.chdir(tmp_path)  # found next to the config
    fts = SimpleNamespace(ft_schedule="s.yaml")
    resolve_schedule_path(fts, [str(tmp_path / "cfg" / "c.yaml")])
    assert fts.ft_schedule == str(tmp_path / "cfg" / "s.yaml")


def test_last_position_reads_where_a_recording_ends(tmp_path: Path) -> None:
    lines = [ev.event_to_json_line(ev.Event(ev.LR, seq, 1.0, "r", "d", {"lrs": {"a": 0.1}}, step=seq * 3,
                                            epoch=seq // 100)) for seq in range(1, 2000)]
    lines.append(ev.event_to_json_line(ev.Event(ev.METRIC, 2000, 1.0, "r", "d", {"metrics": {}}, epoch=42)))
    lines.append(ev.event_to_json_line(ev.Event(ev.STATE, 2001, 1.0, "r", "d", {"state": "finished"})))
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n" + '{"v":1,"kind":"lr","seq":2002,"step":9', encoding="utf-8")  # torn
    # the last step is on an lr event, the last epoch on a later metric event; a state event has neither
    assert last_position(tmp_path) == (1999 * 3, 42)
    assert last_position(path, tail_bytes=300) == (None, 42)  # only the last ~2 lines read: no step in them
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "events.jsonl").write_text("")
    assert last_position(tmp_path / "empty") == (None, None)
    with pytest.raises(FileNotFoundError):
        last_position(tmp_path / "nowhere")


def test_final_state_is_the_last_state_event_when_it_ended_the_run(tmp_path: Path) -> None:
    def line(seq: int, kind: str, data: dict) -> str:
        return ev.event_to_json_line(ev.Event(kind, seq, 1.0, "r", "d", data, step=seq))

    stopped = {"state": "finished", "error": None, "reason": "stopped", "checkpoint": "/x/stop.ckpt",
               "train_steps": 40, "train_seconds": 3.5}
    path = tmp_path / "events.jsonl"
    # a stopped start, then a resumed one still training: nothing has ended
    lines = [line(1, ev.STATE, {"state": "training"}), line(2, ev.STATE, stopped),
             line(1, ev.STATE, {"state": "starting", "resume": True}), line(2, ev.LR, {"lrs": {"a": 0.1}})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert final_state(tmp_path) is None
    # the resumed start fails; log lines after its last state do not hide it, nor does a torn last line
    failed = {"state": "failed", "error": "cannot write checkpoint"}
    path.write_text("\n".join([*lines, line(3, ev.STATE, failed), line(4, ev.LOG, {"level": "info", "message": "m"})])
                    + '\n{"v":1,"kind":"state","seq":5,', encoding="utf-8")
    assert final_state(tmp_path) == failed
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    assert final_state(path) == stopped


def test_history_of_an_earlier_start_is_replaced_where_a_resume_repeats_it() -> None:
    h = RunHistory(max_points=50)
    seq = 0
    for step in range(10):  # the first start: a transition at step 4, LRs up to step 9
        seq += 1
        h.ingest(event(ev.LR, seq, {"lrs": {"lr": 1.0 - step / 10}}, step))
        if step == 4:
            seq += 1
            h.ingest(event(ev.TRANSITION, seq, {"from": 0, "to": 1, "step": 4}, 4))
    # the second start resumed from a checkpoint at step 3: steps 3.. and the transition at 4 happen again
    for i, step in enumerate(range(3, 6)):
        h.ingest(event(ev.LR, i + 1, {"lrs": {"lr": 2.0}}, step, daemon="new"))
        if step == 4:
            h.ingest(event(ev.TRANSITION, 10 + i, {"from": 0, "to": 1, "step": 4}, 4, daemon="new"))
    snap = h.snapshot()
    assert snap["lr"]["lr"] == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 2.0), (4, 2.0), (5, 2.0)]
    assert [(t["step"], t["ts"]) for t in snap["transitions"]] == [(4, 111.0)]  # the new start's, with its ts


def test_bus_folds_earlier_starts_into_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = [
        event(ev.STATE, 1, {"state": "training", "error": None}, 0),
        event(ev.LR, 2, {"lrs": {"lr": 0.1}}, 0),
        event(ev.TRANSITION, 3, {"from": 0, "to": 1, "reason": "epoch_limit", "epoch": 1, "step": 1}, 1),
        event(ev.LR, 4, {"lrs": {"lr": 0.2}}, 1),
        event(ev.EDIT, 5, {"edit": {"id": "e1", "phase": 2, "changes": {"lr": 0.3}, "status": "queued"}}, 1),
        event(ev.LOG, 6, {"level": "info", "message": "before the restart"}, 1),
        event(ev.STATE, 7, {"state": "finished", "error": None, "reason": "stopped"}, 2),
    ]
    path = tmp_path / "events.jsonl"
    # a crash left a torn last line: it is skipped, and the new start's first event is not glued onto it
    path.write_text("".join(ev.event_to_json_line(e) + "\n" for e in old) + '{"v":1,"kind":"lr","se')
    with private_runtime_dir(monkeypatch) as rt:
        bus = EventBus(BusConfig(run="r", pub=f"ipc://{rt}/h.pub", ctl=f"ipc://{rt}/h.ctl", events_path=path,
                                 history_from=path, heartbeat_s=60))
        bus.start()
        try:
            bus.publish(ev.STATE, {"state": "starting", "error": None, "resume": True})
            bus.publish(ev.LR, {"lrs": {"lr": 0.25}}, 2, 1)
            with Control(bus.endpoints[1]) as ctl:
                snap = wait_for(lambda: (s := ctl.request("snapshot"))["lr"]["lr"][-1][0] == 2 and s, timeout=10)
        finally:
            bus.close()
    assert snap["daemon"] == bus.daemon != "old" and snap["seq"] == 3  # its own numbering: 2 events + 1 warning
    assert snap["state"] == "starting" and snap["phase"] == 1
    assert snap["lr"]["lr"] == [[0, 0.1], [1, 0.2], [2, 0.25]]
    assert snap["transitions"] == [{"from": 0, "to": 1, "reason": "epoch_limit", "epoch": 1, "step": 1, "ts": 103.0}]
    assert [e["id"] for e in snap["edits"]] == ["e1"]
    messages = [entry["message"] for entry in snap["logs"]]
    assert messages[0] == "before the restart" and "last line torn" in messages[1]
    lines = path.read_text().splitlines()
    assert lines[len(old)] == '{"v":1,"kind":"lr","se'  # the torn line stays alone on its line
    assert [json.loads(line)["daemon"] for line in lines[len(old) + 1 :]] == [bus.daemon] * 3


# ------------------------------------------------------------------------------------------------ a real run


class ControlProbe(Callback):
    """Asks its own daemon ``op`` as training (re)starts, before any step; or, ``after_training``, as training ends,
    once a client has seen the ``training`` state event (a tiny run can end before its events went out, and a
    client outside the run could then find the daemon gone)."""

    def __init__(self, run: str, op: str, after_training: bool = False) -> None:
        self.run, self.op, self.after_training = run, op, after_training
        self.result: dict[str, Any] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.after_training:
            with Control(registry.read_record(self.run).ctl) as ctl:
                self.result = ctl.request(self.op)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.after_training:
            record = registry.read_record(self.run)
            with Follower(record.pub, record.ctl) as follower:
                for kind, item in follower.follow(timeout=10):
                    if kind == "snapshot" and item["state"] == "training":
                        break
                    if kind == "event" and item.kind == ev.STATE and item.data["state"] == "training":
                        break
                self.result = follower.control.request(self.op)


def test_resume_anywhere_keeps_history_and_run_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = copy.deepcopy(SCHEDULE)
    schedule[0]["max_transition_epoch"] = 1
    schedule[1]["max_transition_epoch"] = 3
    write_config(tmp_path / "cfg", schedule, max_epochs=2, num_train=64, name="h")
    run_dir = tmp_path / "run"
    with private_runtime_dir(monkeypatch):
        monkeypatch.chdir(tmp_path / "cfg")  # the schedule is found from here, by its relative name
        at_end = ControlProbe("h", "hello", after_training=True)
        first = start_daemon(configs=["h.yaml"], run="h", run_dir=run_dir, callbacks=[at_end])
        assert first.join() == 0
        hello = at_end.result
        assert hello is not None
        assert hello["model"] == "TinyClassifier" and hello["module"] == "fts_daemon.examples.tiny.TinyClassifier"
        assert hello["config"] == [str(tmp_path / "cfg" / "h.yaml")] and hello["optimizer"] == "AdamW"
        assert hello["scheduler"]["class_path"] == "torch.optim.lr_scheduler.LinearLR"
        saved = (run_dir / "config.yaml").read_text()
        assert f"ft_schedule: {tmp_path / 'cfg' / 'h_schedule.yaml'}" in saved

        monkeypatch.chdir(tmp_path)  # resume from elsewhere, from the run dir alone
        probe = ControlProbe("h", "snapshot")
        second = start_daemon(configs=[], resume=True, run="h", run_dir=run_dir, callbacks=[probe],
                              overrides=["--trainer.max_epochs=3"])
        assert second.join() == 0, second.daemon.error
    events = read_events(run_dir / "events.jsonl")
    first_events = [e for e in events if e.daemon == events[0].daemon]
    snap = probe.result
    assert snap is not None and snap["daemon"] == second.daemon.bus.daemon != events[0].daemon
    # everything before the restart: the transition (with its time), every LR step, the logs
    first_lr_steps = sorted({e.step for e in first_events if e.kind == ev.LR})
    assert [p[0] for p in next(iter(snap["lr"].values()))][: len(first_lr_steps)] == first_lr_steps
    first_transition = next(e for e in first_events if e.kind == ev.TRANSITION and e.data["from"] == 0)
    assert [(t["to"], t["step"], t["ts"]) for t in snap["transitions"] if t["from"] is not None] == [
        (1, first_transition.step, first_transition.ts)
    ]
    assert any("phase 1 starts" in entry["message"] for entry in snap["logs"])
    assert snap["metrics"]["val_loss"]["points"]
    # a TUI attaching now shows the run so far, and what it trains
    state = RunState()
    state.apply_snapshot(snap)
    assert [t.to_phase for t in state.transitions] == [1] and state.info["model"] == "TinyClassifier"
    header = "".join(text for text, _ in header_lines(state, time.time(), "test")[0])
    # resumed from the run dir's saved config.yaml, which names the config the run was started with
    assert "TinyClassifier (h.yaml)" in header and snap["config"] == [str(tmp_path / "cfg" / "h.yaml")]
    # LearningRateMonitor's keys are LRs, not metrics; nor is the phase counter
    names = {n for e in events if e.kind == ev.METRIC for n in e.data["metrics"]}
    assert names == {"train_loss", "val_loss", "val_acc"}
    assert os.path.isabs(saved.split("ft_schedule: ")[1].split()[0])

    # a third start, resumed in phase 1: the trainer holds phase 1's scheduler, and phase 0's comes from the
    # recording (the TUI showed "(module's own)" for phase 0 after such a resume)
    torn = run_dir / "checkpoints" / ".stop-epoch=2-step=11.ckpt.tmp"  # as a kill during a stop's write leaves it
    torn.write_bytes(b"PK\x03\x04 partial")
    with private_runtime_dir(monkeypatch):
        late = ControlProbe("h", "hello")
        third = start_daemon(configs=[], resume=True, run="h", run_dir=run_dir, callbacks=[late],
                             overrides=["--trainer.max_epochs=4"])
        # listening, not yet training: `runs` and `status` already say the phase the recording left off in
        assert registry.read_record("h").phase == 1
        assert third.join() == 0, third.daemon.error
    assert late.result is not None and late.result["phase"] == 1
    assert late.result["scheduler"] == hello["scheduler"]
    assert not torn.exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_refused_edits_all_reach_a_snapshot() -> None:
    """Refused queue_edit requests have no id: keyed by it, a late subscriber saw only the last of them."""
    import json

    h = RunHistory()
    refused = [{"id": None, "phase": 2, "changes": {"lr": i}, "status": "rejected", "error": f"no {i}"} for i in (1, 2)]
    h.ingest(event(ev.EDIT, 1, {"edit": {"id": "e1", "phase": 2, "changes": {"lr": 0.1}, "status": "queued"}}, 3))
    for i, edit in enumerate(refused):
        h.ingest(event(ev.EDIT, 2 + i, {"edit": edit}, 3))
    for snap in (h.snapshot(), json.loads(h.snapshot_json())):
        assert [e["id"] for e in snap["edits"]] == ["e1", None, None]
        assert [e["error"] for e in snap["edits"][1:]] == ["no 1", "no 2"]


def test_a_fresh_start_in_a_run_dir_that_trained_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It appended to the earlier run's events.jsonl, and a later --resume could take the earlier run's checkpoint.
    A run dir whose earlier start never trained (a config error) is reused, its recording and journal kept aside."""
    from fts_daemon.runner import Daemon, StartOptions

    cfg = write_config(tmp_path / "cfg", max_epochs=1, name="f")
    run_dir = tmp_path / "run"
    with private_runtime_dir(monkeypatch):
        first = start_daemon(configs=[str(cfg)], run="f1", run_dir=run_dir)
        assert first.join() == 0, first.daemon.error
        before = (run_dir / "events.jsonl").read_bytes()
        again = Daemon(StartOptions(configs=[str(cfg)], run="f2", run_dir=run_dir, progress=False,
                                    install_signals=False))
        assert again.run() == 2
        assert again.error == (f"run dir {run_dir} holds run 'f1', which trained: continue it with `fts-daemon start "
                               f"--resume --run-dir {run_dir}`, or give this run another --run-dir (or --run)")
        assert (run_dir / "events.jsonl").read_bytes() == before  # nothing of the refused start in it

        never = tmp_path / "never"  # an earlier start that failed on its config, before any step
        never.mkdir()
        failed = [ev.Event(ev.STATE, 1, 1.0, "f3", "d", {"state": "starting", "error": None, "resume": False}),
                  ev.Event(ev.STATE, 2, 2.0, "f3", "d", {"state": "failed", "error": "config file not found"})]
        (never / "events.jsonl").write_text("".join(ev.event_to_json_line(e) + "\n" for e in failed))
        (never / "edits.jsonl").write_text("")
        fresh = start_daemon(configs=[str(cfg)], run="f3", run_dir=never)
        assert fresh.join() == 0, fresh.daemon.error
    kept = sorted(p.name for p in never.glob("*.jsonl"))
    assert len(kept) == 3 and kept[0].startswith("edits.2") and kept[1].startswith("events.2"), kept
    assert read_events(never / "events.jsonl")[0].data["state"] == "starting"  # this start's own, from seq 1
    assert len(read_events(never / kept[1])) == 2
