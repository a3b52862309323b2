"""Does singularity smoothing widen the range of stable learning rates? The same config trained at
each learning rate with smoothing off and on, through the real entry point; writes a plot of the
loss curves per learning rate and prints a markdown table (final loss, largest gradient norm,
smoothed and skipped steps, throughput).

    .venv/bin/python benchmarks/smoothing.py configs/tiny-qwen3-moe.yaml [key=value ...] \
        [--lrs 0.003 0.03 0.1 --steps 200 --out benchmarks/results/smoothing.png]
"""
import argparse
import math
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runs import train  # noqa: E402

SETTINGS = {"off": ["smoothing.enabled=false"], "on": ["smoothing.enabled=true"]}


def summary(rows: list[dict]) -> dict:
    tail = [r["loss"] for r in rows[-10:]]
    return {"final loss": statistics.mean(tail) if all(math.isfinite(x) for x in tail) else math.nan,
            "max grad norm": max(r["grad_norm"] for r in rows), "smoothed": rows[-1].get("smoothed_steps", 0),
            "skipped": rows[-1]["skipped_steps"],
            "tokens/s": statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.03, 0.1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/smoothing.png")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            for setting, overrides in SETTINGS.items():
                # every step logged; a diverging run keeps going (its skipped steps are the result)
                runs[lr, setting] = train(args.config, [*args.overrides, *overrides, f"train.lr={lr}",
                                                        f"train.max_steps={args.steps}", "train.log_interval=1",
                                                        "train.eval_interval=0", "train.max_skipped_steps=0"],
                                          Path(tmp) / f"{lr}-{setting}")
    fig, axes = plt.subplots(1, len(args.lrs), figsize=(4.2 * len(args.lrs), 3.6), squeeze=False)
    for ax, lr in zip(axes[0], args.lrs):
        for setting in SETTINGS:
            rows = runs[lr, setting]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"smoothing {setting}")
        ax.set(title=f"lr {lr:g}", xlabel="step", ylabel="train loss")
        ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}\n")
    columns = ["lr", "smoothing", "final train loss (last 10)", "max grad norm", "smoothed steps", "skipped steps",
               "tokens/s (median, 2nd half)"]
    print(f"| {' | '.join(columns)} |\n|{' --- |' * len(columns)}")
    for (lr, setting), rows in runs.items():
        s = summary(rows)
        print(f"| {lr:g} | {setting} | {s['final loss']:.3f} | {s['max grad norm']:.2f} | {s['smoothed']} | "
              f"{s['skipped']} | {s['tokens/s']:.0f} |")


if __name__ == "__main__":
    main()
