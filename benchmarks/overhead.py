"""Step time of an MoE variant (SD-MoE, head-wise routing) against the flat topk MoE of the same
config file, measured side by side: the two alternate (A B A B ...) through the real entry point,
and each run's mean step time after warm-up is compared (the mean, not the median: SD-MoE's basis
refresh every `sdmoe.refresh_interval` steps is part of its cost).

The flat MoE is the file's moe section; for head-wise routing use a config whose headwise section
is budget-matched to it (configs/tiny-headwise.yaml, or `sdmoe-budget`), so both have the same
active parameters.

    .venv/bin/python benchmarks/overhead.py configs/tiny-qwen3-moe.yaml [key=value ...] \
        [--variant sdmoe --steps 30 --repeats 2 --warmup 5]
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from runs import train



def run(config: str, overrides: list[str], variant: str, steps: int, run_dir: Path) -> list[float]:
    """Each step's seconds per token (every step has the same tokens: their mean is the mean step's)."""
    rows = train(config, [*overrides, f"moe.variant={variant}", f"train.max_steps={steps}", "train.log_interval=1",
                          "train.eval_interval=0"], run_dir)
    return [1 / row["tokens_per_s"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--variant", default="sdmoe", choices=["sdmoe", "headwise", "headwise_sdmoe"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each run's mean")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"topk": [], args.variant: []}  # tokens/s of each run
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in rates:
                seconds = run(args.config, args.overrides, variant, args.steps, Path(tmp) / f"{variant}{repeat}")
                rates[variant].append(1 / statistics.mean(seconds[args.warmup:]))
                print(f"{variant} run {repeat + 1}: {rates[variant][-1]:.0f} tokens/s", flush=True)
    topk, other = statistics.median(rates["topk"]), statistics.median(rates[args.variant])
    print(f"| variant | tokens/s (median of runs) |\n| --- | --- |\n| topk | {topk:.0f} |\n"
          f"| {args.variant} | {other:.0f} |")
    print(f"{args.variant} step time / topk step time = {topk / other:.3f}")


if __name__ == "__main__":
    main()
