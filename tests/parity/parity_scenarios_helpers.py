"""Helpers that schedules refer to by ``class_path``.

This module must be importable by a plain module name (``parity_scenarios_helpers``) in both the
oracle environment (real finetuning-scheduler) and ours, so it has no dependency on Lightning.
Runners put ``tests/parity`` on ``sys.path`` (``scenarios.py`` does it too, on import).
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LinearWarmupLR"]


class LinearWarmupLR(LambdaLR):
    """A ``LambdaLR`` that ramps linearly up over ``warmup_steps`` and then decays linearly to zero at
    ``total_steps``.

    factor(step) = (step + 1) / (warmup_steps + 1)                       for step <  warmup_steps
                 = max(0, (total_steps - step) / (total_steps - warmup_steps))  otherwise
    """

    def __init__(self, optimizer, warmup_steps: int = 4, total_steps: int = 40, last_epoch: int = -1) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        warm, total = self.warmup_steps, self.total_steps

        def _factor(step: int) -> float:
            if step < warm:
                return float(step + 1) / float(warm + 1)
            return max(0.0, float(total - step) / float(max(1, total - warm)))

        super().__init__(optimizer, _factor, last_epoch=last_epoch)
