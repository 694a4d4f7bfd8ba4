"""The 20-line client in docs/protocol.md works as written (run in its own process against a real bus)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fts_daemon import events as ev
from fts_daemon import registry
from fts_daemon.bus import BusConfig, EventBus

from .daemon_support import REPO, private_runtime_dir, wait_for


def doc_client() -> str:
    text = (REPO / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "no python block in docs/protocol.md"
    return blocks[-1]


def test_the_documented_client_follows_a_run_and_queues_an_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = doc_client()
    assert len(script.strip().splitlines()) <= 21
    with private_runtime_dir(monkeypatch) as rt:
        bus = EventBus(BusConfig(run="doc", pub=f"ipc://{rt}/doc.pub", ctl=f"ipc://{rt}/doc.ctl", heartbeat_s=60))
        queued: list[dict] = []
        bus.register("queue_edit", lambda args: queued.append(args) or {"id": "e1", **args, "status": "queued"},
                     ("phase", "changes"))
        pub, ctl = bus.start()
        registry.write_record(registry.RunRecord(run="doc", pid=os.getpid(), daemon=bus.daemon, run_dir=str(tmp_path),
                                                 pub=pub, ctl=ctl))
        bus.publish(ev.STATE, {"state": "starting", "error": None})
        path = tmp_path / "client.py"
        path.write_text(script)
        proc = subprocess.Popen([sys.executable, str(path), "doc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            # a daemon refuses edits while it is starting: the client, having read its snapshot, waits for training
            first = proc.stdout.readline() if proc.stdout else ""
            assert first.startswith("run doc state starting"), first
            time.sleep(0.5)
            assert not queued and proc.poll() is None
            bus.publish(ev.STATE, {"state": "training", "error": None})
            wait_for(lambda: queued, timeout=30)
            step = 0
            while proc.poll() is None and step < 2000:  # keep the stream going until the client has seen the end
                bus.publish(ev.LR, {"lrs": {"lr-AdamW": 0.1}}, step, 0)
                if step >= 20:
                    bus.publish(ev.STATE, {"state": "finished", "error": None})
                step += 1
                time.sleep(0.01)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            bus.close()
    assert proc.returncode == 0, err
    assert queued == [{"phase": 2, "changes": {"lr": 1e-4}}]
    assert "queued e1" in out
    assert "fts.v1.lr" in out and "fts.v1.state" in out
