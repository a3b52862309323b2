"""Step time of SD-MoE against the topk baseline on the same config, measured side by side:
the two variants alternate (A B A B ...) through the real entry point, and each run's median
tokens/s after warm-up is compared.

    .venv/bin/python benchmarks/sdmoe_overhead.py configs/tiny-qwen3-moe.yaml [key=value ...] \
        [--steps 30 --repeats 2 --warmup 5]
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from runs import train

VARIANTS = {"topk": ["moe.variant=topk"], "sdmoe": ["moe.variant=sdmoe"]}


def run(config: str, overrides: list[str], variant: str, steps: int, run_dir: Path) -> list[float]:
    rows = train(config, [*overrides, *VARIANTS[variant], f"train.max_steps={steps}", "train.log_interval=1",
                          "train.eval_interval=0"], run_dir)
    return [row["tokens_per_s"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each run's median")
    args = parser.parse_args()
    medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                rates = run(args.config, args.overrides, variant, args.steps, Path(tmp) / f"{variant}{repeat}")
                medians[variant].append(statistics.median(rates[args.warmup:]))
                print(f"{variant} run {repeat + 1}: median {medians[variant][-1]:.0f} tokens/s", flush=True)
    topk, sdmoe = statistics.median(medians["topk"]), statistics.median(medians["sdmoe"])
    print(f"| variant | tokens/s (median of runs) |\n| --- | --- |\n| topk | {topk:.0f} |\n| sdmoe | {sdmoe:.0f} |")
    print(f"sdmoe step time / topk step time = {topk / sdmoe:.3f}")


if __name__ == "__main__":
    main()
