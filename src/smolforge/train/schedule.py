"""Learning-rate schedules as a multiplier of the peak LR (playbook ch. 04, "optimiser").

Warmup is linear from 0. After it:
- `wsd`: warmup-stable-decay; constant, then linear decay to `min_ratio` over the last
  `decay_fraction` of the steps (SmolLM3 decayed linearly to 0 over the last ~11%; the
  playbook finds 10-20% decay matches cosine);
- `cosine`: cosine from 1 to `min_ratio`;
- `linear`: linear from 1 to `min_ratio`;
- `constant`: 1.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str,
                  decay_fraction: float = 0.2, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
    else:
        progress = (step - warmup_steps + 1) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind in ("linear", "wsd"):
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {kind!r}")
