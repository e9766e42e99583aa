"""Optional experiment trackers next to `metrics.jsonl`: TensorBoard and Weights & Biases.

DESIGN.md's logging contract: `metrics.jsonl` always; TensorBoard and W&B when installed and
asked for (`train.report_to`). Asking for one that is not installed fails before any work.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from smolforge.errors import SmolforgeError


class Trackers:
    """Fans each metrics record out to the trackers named in `train.report_to`."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SmolforgeError("train.report_to asks for 'tensorboard', which is not installed: "
                                     "pip install tensorboard, or drop it from train.report_to") from None
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise SmolforgeError("train.report_to asks for 'wandb', which is not installed: "
                                     "pip install wandb, or drop it from train.report_to") from None
            # One W&B run per smolforge run directory, resumed along with it.
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "smolforge"), name=run_name,
                                    id=f"{run_name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}",
                                    dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
