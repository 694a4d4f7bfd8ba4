"""The TUI and the protocol/schedule types must import without torch or Lightning (fast TUI start)."""

from __future__ import annotations

import subprocess
import sys


def assert_imports_without(modules: str, heavy: tuple[str, ...]) -> None:
    """Import ``modules`` in a fresh interpreter; none of ``heavy`` may come along."""
    code = f"import sys, {modules}\nheavy = [m for m in {heavy!r} if m in sys.modules]\nassert not heavy, heavy\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tui_and_protocol_do_not_import_torch() -> None:
    assert_imports_without("fts_tui, fts_daemon, fts_daemon.events, fts_daemon.schedule",
                           ("torch", "pytorch_lightning", "lightning"))


def test_clone_rules_and_history_need_neither_zmq_nor_torch() -> None:
    assert_imports_without("fts_daemon.clone, fts_daemon.history", ("zmq", "torch", "pytorch_lightning"))


def test_package_exports_callbacks() -> None:
    import fts_daemon

    assert {"FinetuningScheduler", "FTSEarlyStopping", "FTSCheckpoint"} <= set(fts_daemon.__all__)
    assert fts_daemon.FinetuningScheduler.__name__ == "FinetuningScheduler"


def test_control_ops_answered_before_training_import_nothing() -> None:
    """The ops thread answers a TUI's `plan`, `queue_edit` and `cancel_edit` while the main thread is still importing
    Lightning; an import there can end in importlib's _DeadlockError (seen: a resume failing 3 times in 12 with a
    TUI attached). Before training, those answers must not import a module."""
    code = """
import sys
from pathlib import Path
from fts_daemon.bus import OpError
from fts_daemon.edits import EditQueue, Journal
from fts_daemon.runner import Daemon, StartOptions
daemon = Daemon(StartOptions(configs=[], run="x"))
daemon.edits = EditQueue(Journal(Path("/nonexistent/edits.jsonl")), lambda *a, **k: None)
before = set(sys.modules)
for op, args in ((daemon._op_plan, {}), (daemon._op_queue_edit, {"phase": 2, "changes": {"lr": 0.1}}),
                 (lambda a: daemon._edit_op(lambda q: q.cancel("e1")), {})):
    try:
        op(args)
    except OpError:
        pass
new = sorted(set(sys.modules) - before)
assert not new, new
"""
    subprocess.run([sys.executable, "-c", code], check=True)
