"""Pytest hooks shared by the whole suite."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the reliability tests measured (``tests/reliability_support.figure``), even without ``-s``."""
    from tests.reliability_support import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for record in FIGURES:
            terminalreporter.write_line(f"{record['key']}: {record['text']}")
