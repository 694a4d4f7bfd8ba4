"""The TUI and the protocol/schedule types must import without torch or Lightning (fast TUI start)."""

from __future__ import annotations

import subprocess
import sys


def test_tui_and_protocol_do_not_import_torch() -> None:
    code = (
        "import sys, fts_tui, fts_daemon, fts_daemon.events, fts_daemon.schedule\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports_callbacks() -> None:
    import fts_daemon

    assert {"FinetuningScheduler", "FTSEarlyStopping", "FTSCheckpoint"} <= set(fts_daemon.__all__)
    assert fts_daemon.FinetuningScheduler.__name__ == "FinetuningScheduler"
