"""Training throughput and MFU of a config on this machine's GPU, through the real entry point,
next to sdmoe-estimate's memory estimate for it.

    python3 benchmarks/mfu.py [configs/qwen3-moe-1gpu.yaml] [key=value ...] [--steps 30 --warmup 10] [--profile]

Trains `--steps` steps in one process on the config's data (the built-in sample corpus unless
data.* says otherwise) and reports, over the steps after warm-up, tokens/s (total tokens over
total time), TFLOP/s per GPU and MFU as the training metrics count them (sdmoe-estimate's FLOPs
per token; the device's dense peak), and the peak GPU memory next to the estimate. `--profile`:
two more steps under torch.profiler (not in the means), and the top of its operator table.
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from runs import train

from megatron_sdmoe.config import load_config
from megatron_sdmoe.estimate import estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/qwen3-moe-1gpu.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the means")
    parser.add_argument("--profile", action="store_true", help="profile two more steps; print the operator table")
    args = parser.parse_intermixed_args()
    extra = [f"train.profile_steps=[{args.steps + 1}, {args.steps + 2}]"] if args.profile else []
    overrides = [*args.overrides, f"train.max_steps={args.steps + 2 * args.profile}", *extra,
                 "train.log_interval=1", "train.eval_interval=0"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = train(args.config, overrides, Path(tmp) / "run")[args.warmup:args.steps]
        table = (Path(tmp) / "run" / "profile" / "ops_rank0.txt").read_text() if args.profile else ""
    cfg = load_config(args.config, overrides)
    planned, _ = estimate(cfg, gpus=1, precision="bf16" if torch.cuda.is_available() else "fp32")
    tokens_per_s = 1 / statistics.mean(1 / row["tokens_per_s"] for row in rows)
    # The training metrics' own FLOPs per token and peak (each row's TFLOP/s over its tokens/s and MFU)
    first = rows[0]
    tflops = tokens_per_s * first["tflops_per_gpu"] / first["tokens_per_s"]
    mfu = tflops / (first["tflops_per_gpu"] / first["mfu"]) if "mfu" in first else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    memory = max((row["max_memory_gib"] for row in rows if "max_memory_gib" in row), default=None)
    print(f"{device}: {planned.params_total / 1e6:,.1f}M parameters, {planned.params_active / 1e6:,.1f}M active, "
          f"{planned.flops_per_token / 1e9:.3g} GFLOP per token, {len(rows)} steps after {args.warmup} of warm-up")
    print("| tokens/s | TFLOP/s per GPU | MFU | peak memory GiB | estimated GiB |\n| --- | --- | --- | --- | --- |")
    print(f"| {tokens_per_s:,.0f} | {tflops:.3g} | {f'{mfu:.1%}' if mfu is not None else '-'} | "
          f"{f'{memory:.1f}' if memory is not None else '-'} | {planned.total_gib:.1f} |")
    print("\n".join(table.splitlines()[:40]))


if __name__ == "__main__":
    main()
