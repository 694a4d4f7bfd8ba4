"""DDP on CPU (gloo, 2 processes): same per-epoch LR trajectory as one process; replicas stay identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(devices: int, out: Path, mode: str = "plain") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(WORKER), str(devices), str(out), mode], check=True, timeout=240, cwd=out)
    return [json.loads((out / f"rank{r}_of_{devices}.json").read_text()) for r in range(devices)]


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    single = _run(1, tmp_path / "single")[0]
    rank0, rank1 = _run(2, tmp_path / "ddp")
    # per-epoch phase and LRs (epoch-interval schedulers) equal the single-process run
    assert rank0["epochs"] == rank1["epochs"] == single["epochs"]
    assert [depth for _, depth, _ in rank0["epochs"]] == [0, 1, 2, 3, 3]
    # parameters thawed in later phases are all-reduced too (DDP re-wrapped at each transition)
    for name, values in rank0["weights"].items():
        assert values == rank1["weights"][name], f"{name} differs between ranks"


def test_edit_applied_on_rank_zero_reaches_every_rank(tmp_path: Path) -> None:
    expected = _run(1, tmp_path / "yaml", "edit-in-yaml")[0]
    rank0, rank1 = _run(2, tmp_path / "ddp", "edit-on-rank0")
    assert rank0["epochs"] == rank1["epochs"] == expected["epochs"]
    assert rank0["epochs"][2][1:] == [2, [3e-4, 2e-4, 4e-5]]  # phase 2 starts with the edited init_pg_lrs
    for name, values in rank0["weights"].items():
        assert values == rank1["weights"][name], f"{name} differs between ranks"
