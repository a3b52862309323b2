"""Run metrics: one JSON object per logged step in metrics.jsonl, the same as TensorBoard scalars."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sdmoe.config import Config
from megatron_sdmoe.errors import writing_into
from megatron_sdmoe.estimate import flops_per_token, peak_tflops


class Throughput:
    """tokens/s -> tokens/s, TFLOP/s per GPU (sdmoe-estimate's FLOPs per token) and, where the
    device's peak is known (or train.peak_tflops is set), MFU."""

    def __init__(self, cfg: Config, vocab_size: int, world_size: int, bf16: bool):
        self.flops_per_token, self.world_size = flops_per_token(cfg, vocab_size), world_size
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak = cfg.train.peak_tflops or peak_tflops(device, bf16)

    def __call__(self, tokens_per_s: float) -> dict[str, float]:
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        result = {"tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops}
        if self.peak:
            result["mfu"] = tflops / self.peak
        return result


def device_memory() -> dict[str, float]:
    """On a GPU: the peak memory PyTorch has allocated so far, in GiB (to set beside sdmoe-estimate)."""
    return {"max_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}


def _tensorboard_tag(key: str) -> str:
    """val_loss -> val/loss, test_loss_<dataset> -> test/loss_<dataset>, stage_* and bwt under
    stages/, the rest under train/."""
    for section in ("val", "test"):
        if key.startswith(section + "_"):
            return f"{section}/{key[len(section) + 1:]}"
    return f"stages/{key}" if key.startswith("stage_") or key == "bwt" else f"train/{key}"


REPLACED = "metrics_replaced.jsonl"


def moe_layer_labels(model: torch.nn.Module) -> list[str]:
    """The TensorBoard name of each MoE layer, in the order of the per-layer lists (module order;
    one router per layer, head-wise too): `layer_<i>` for decoder layer i (dense layers have none),
    `mtp_<k>` for multi-token-prediction layer k."""
    names = [name for name, module in model.named_modules() if isinstance(module, TopKRouter)]
    labels = [re.match(r"(decoder|mtp)\.layers\.(\d+)\.", name) for name in names]
    return [f"{'layer' if match[1] == 'decoder' else 'mtp'}_{match[2]}" for match in labels]


class MetricsLogger:
    """Writes on the main rank only; other ranks hold a disabled logger.

    The logs hold the history that leads to the checkpoint a run starts from: what was logged past
    it (the steps since the last checkpoint before a crash, or a rolled-back run's) moves from
    metrics.jsonl to metrics_replaced.jsonl, and TensorBoard hides it (its purge_step)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, layer_labels: list[str] = ()):
        """`layer_labels`: the per-layer lists' names in TensorBoard (moe_layer_labels)."""
        self.enabled, self.run_dir, self.layer_labels = enabled, run_dir, list(layer_labels)
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _move_lines_past(start_step, run_dir / "metrics.jsonl", run_dir / REPLACED)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, float], per_layer: dict[str, list[float]] | None = None) -> None:
        """One metrics line and its TensorBoard scalars; a write that fails (a full disk) is this
        rank's one-line error (the launcher ends the others, as for running out of GPU memory)."""
        if not self.enabled:
            return
        per_layer = per_layer or {}
        with writing_into(self.run_dir):
            self.jsonl.write(json.dumps({"step": step, **scalars, **per_layer}) + "\n")
            self.jsonl.flush()
            for key, value in scalars.items():
                self.tb.add_scalar(_tensorboard_tag(key), value, step)
            for key, values in per_layer.items():
                if values and isinstance(values[0], list):  # a value per expert: one layers x experts image
                    self.tb.add_figure(f"moe/{key}", _per_expert_figure(key, values, self.layer_labels, step), step)
                    continue
                for label, value in zip(self.layer_labels, values, strict=True):
                    self.tb.add_scalar(f"moe/{key}/{label}", value, step)
            self.tb.flush()  # raises what TensorBoard's writer thread met

    def log_heatmaps(self, step: int, tag: str, matrices: list) -> None:
        """One heatmap image per layer (e.g. the experts' overlap matrix) in TensorBoard."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for label, matrix in zip(self.layer_labels, matrices, strict=True):
            fig, ax = plt.subplots(figsize=(4, 3.4))
            image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set(title=f"{tag}, {label}, step {step}", xlabel="expert", ylabel="expert")
            fig.colorbar(image, ax=ax)
            self.tb.add_figure(f"moe/{tag}/{label}", fig, step)  # closes the figure
        self.tb.flush()

    def log_figure(self, step: int, tag: str, figure) -> None:
        if self.enabled:
            self.tb.add_figure(tag, figure, step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _move_lines_past(step: int, path: Path, replaced: Path) -> None:
    """Append the lines of `path` logged after `step` to `replaced` and rewrite `path` without them
    (atomically: a crash leaves one of the two versions)."""
    if not path.exists():
        return
    kept, past = [], []
    for line in path.read_text().splitlines(keepends=True):
        (kept if logged_step(line) <= step else past).append(line)
    if past:
        with open(replaced, "a") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in past)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _per_expert_figure(key: str, shares: list[list[float]], labels: list[str], step: int):
    """MoE layers x experts, each expert's share of its layer's routings against an even split
    (log2 of share x experts: 0 balanced, +1 twice its share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, experts = len(shares), len(shares[0])
    with np.errstate(divide="ignore"):  # an idle expert: -inf, drawn as the scale's end
        values = np.clip(np.log2(np.asarray(shares) * experts), -2, 2)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.3 * experts + 2.5), 0.3 * layers + 2.0))
    image = ax.imshow(values, aspect="auto", cmap="coolwarm", vmin=-2, vmax=2)
    ax.set(title=f"{key}, step {step}", xlabel="expert", ylabel="MoE layer")
    ax.set_yticks(range(layers), labels)
    fig.colorbar(image, ax=ax, label="log2(share x experts)")
    fig.tight_layout()
    return fig


def logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash mid-write counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
