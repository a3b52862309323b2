"""Does SD-MoE make experts specialise? topk and sdmoe trained on the same data for the same steps
through the real entry point, with the specialisation diagnostics on; writes a plot of loss and
mean inter-expert overlap and token concentration over time, and prints a markdown table (the token
concentration: `val_token_concentration`, mean over layers, which equals `sdmoe-eval --routes` at
a checkpoint).

    .venv/bin/python benchmarks/specialisation.py configs/tiny-qwen3-moe.yaml [key=value ...] \
        [--steps 300 --diag-interval 25 --out benchmarks/results/specialisation.png]
"""
import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runs import train  # noqa: E402

VARIANTS = ("topk", "sdmoe")


def run(config: str, overrides: list[str], variant: str, steps: int, diag: int, run_dir: Path) -> list[dict]:
    return train(config, [*overrides, f"moe.variant={variant}", f"train.max_steps={steps}", f"moe.diag_interval={diag}",
                          f"train.eval_interval={diag}", "train.log_interval=5"], run_dir)


def layer_mean(row: dict, key: str) -> float:
    return sum(row[key]) / len(row[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--diag-interval", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/specialisation.png")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            runs[variant] = run(args.config, args.overrides, variant, args.steps, args.diag_interval,
                                  Path(tmp) / variant)
    fig, (ax_loss, ax_overlap, ax_tokens) = plt.subplots(1, 3, figsize=(15, 3.8))
    for variant, rows in runs.items():
        diag = [r for r in rows if "expert_overlap" in r]
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{variant} train")
        ax_loss.plot([r["step"] for r in diag], [r["val_loss"] for r in diag], "--", label=f"{variant} validation")
        ax_overlap.plot([r["step"] for r in diag], [layer_mean(r, "expert_overlap") for r in diag], label=variant)
        ax_tokens.plot([r["step"] for r in diag], [layer_mean(r, "val_token_concentration") for r in diag],
                       label=variant)
        if "unique_overlap" in diag[0]:
            ax_overlap.plot([r["step"] for r in diag], [layer_mean(r, "unique_overlap") for r in diag], ":",
                            label=f"{variant} unique parts")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_overlap.set(xlabel="step", ylabel="mean off-diagonal overlap", title="inter-expert weight overlap", ylim=(0, 1))
    ax_tokens.set(xlabel="step", ylabel="mean over layers", title="token concentration (validation)", ylim=(0, 1))
    for ax in (ax_loss, ax_overlap, ax_tokens):
        ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}\n")
    print("| variant | final train loss | final val loss | overlap (first diag) | overlap (last) | unique-part overlap "
          "(last) | grad alignment (last) | router specificity (last) | token concentration (last) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, rows in runs.items():
        diag = [r for r in rows if "expert_overlap" in r]
        print(f"| {variant} | {rows[-1]['loss']:.3f} | {diag[-1]['val_loss']:.3f} | "
              f"{layer_mean(diag[0], 'expert_overlap'):.3f} | {layer_mean(diag[-1], 'expert_overlap'):.3f} | "
              f"{format(layer_mean(diag[-1], 'unique_overlap'), '.3f') if 'unique_overlap' in diag[-1] else '-'} | "
              f"{layer_mean(diag[-1], 'grad_alignment'):.3f} | {layer_mean(diag[-1], 'router_specificity'):.2f} | "
              f"{layer_mean(diag[-1], 'val_token_concentration'):.3f} |")


if __name__ == "__main__":
    main()
