"""fts daemon: phased fine-tuning with LR scheduler reinitialization, streamed over ZeroMQ.

The callback classes are imported lazily so that torch-free modules of this package (``fts_daemon.schedule``,
``fts_daemon.events``) stay importable by the TUI without pulling in torch or Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FinetuningScheduler", "FTSEarlyStopping", "FTSCheckpoint", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from fts_daemon.callback import FinetuningScheduler
    from fts_daemon.supporters import FTSCheckpoint, FTSEarlyStopping


def __getattr__(name: str) -> Any:
    if name == "FinetuningScheduler":
        from fts_daemon.callback import FinetuningScheduler

        return FinetuningScheduler
    if name in ("FTSEarlyStopping", "FTSCheckpoint"):
        from fts_daemon import supporters

        return getattr(supporters, name)
    raise AttributeError(f"module 'fts_daemon' has no attribute {name!r}")
