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
