"""Run metrics: one JSON object per logged step in metrics.jsonl, the same as TensorBoard scalars."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Writes on the main rank only; other ranks hold a disabled logger."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, scalars: dict[str, float], per_layer: dict[str, list[float]] | None = None) -> None:
        if not self.enabled:
            return
        per_layer = per_layer or {}
        self.jsonl.write(json.dumps({"step": step, **scalars, **per_layer}) + "\n")
        self.jsonl.flush()
        for key, value in scalars.items():
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.tb.add_scalar(tag, value, step)
        for key, values in per_layer.items():
            for layer, value in enumerate(values):
                self.tb.add_scalar(f"moe/{key}/layer_{layer}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
