"""Does SD-MoE make experts specialise? topk and SD-MoE (as the paper runs it, with
sdmoe.project_updates, and with per-expert common matrices) trained on the same data for the same
steps through the real entry point, with the specialisation diagnostics on; writes a plot of loss,
mean inter-expert overlap, the share of the unique parts outside the complement and token concentration
over time, and prints a markdown table (the token concentration: `val_token_concentration`, mean
over layers, which equals `sdmoe-eval --routes` at a checkpoint).

    .venv/bin/python benchmarks/specialisation.py configs/tiny-qwen3-moe.yaml [key=value ...] \
        [--steps 300 --diag-interval 25 --variants topk sdmoe ... --out benchmarks/results/specialisation.png]
"""
import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runs import train  # noqa: E402

VARIANTS = {
    "topk": ["moe.variant=topk"],
    "sdmoe": ["moe.variant=sdmoe"],
    "sdmoe project_updates": ["moe.variant=sdmoe", "sdmoe.project_updates=true"],
    "sdmoe per_expert": ["moe.variant=sdmoe", "sdmoe.common=per_expert"],
}


def run(config: str, overrides: list[str], variant: str, steps: int, diag: int, run_dir: Path) -> list[dict]:
    return train(config, [*overrides, *VARIANTS[variant], f"train.max_steps={steps}", f"moe.diag_interval={diag}",
                          f"train.eval_interval={diag}", "train.log_interval=5"], run_dir)


def last(diag: list[dict], key: str) -> str:
    return format(layer_mean(diag[-1], key), ".3f") if key in diag[-1] else "-"


def layer_mean(row: dict, key: str) -> float:
    return sum(row[key]) / len(row[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--diag-interval", type=int, default=25)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/specialisation.png")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            runs[variant] = run(args.config, args.overrides, variant, args.steps, args.diag_interval,
                                Path(tmp) / variant.replace(" ", "_"))
    fig, (ax_loss, ax_overlap, ax_leak, ax_tokens) = plt.subplots(1, 4, figsize=(20, 4))
    for variant, rows in runs.items():
        diag, color = [r for r in rows if "expert_overlap" in r], f"C{list(VARIANTS).index(variant)}"
        steps = [r["step"] for r in diag]
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, label=variant, lw=0.8)
        ax_loss.plot(steps, [r["val_loss"] for r in diag], "--", color=color)
        ax_overlap.plot(steps, [layer_mean(r, "expert_overlap") for r in diag], color=color)
        ax_tokens.plot(steps, [layer_mean(r, "val_token_concentration") for r in diag], color=color)
        if "unique_overlap" in diag[0]:
            ax_overlap.plot(steps, [layer_mean(r, "unique_overlap") for r in diag], ":", color=color)
            ax_leak.plot(steps, [layer_mean(r, "unique_off_complement") for r in diag], color=color)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss (dashed: validation)")
    ax_loss.legend(fontsize="small")
    ax_overlap.set(xlabel="step", ylabel="mean off-diagonal overlap", ylim=(0, 1),
                   title="inter-expert weight overlap (dotted: unique parts)")
    ax_leak.set(xlabel="step", ylabel="share of |U_e|^2, mean over layers", ylim=(0, None),
                title="unique parts outside the complement")
    ax_tokens.set(xlabel="step", ylabel="mean over layers", title="token concentration (validation)", ylim=(0, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}\n")
    print("| variant | final train loss | final val loss | overlap (first diag) | overlap (last) | unique-part overlap "
          "(last) | unique parts outside the complement (last) | grad alignment (last) | router specificity (last) | "
          "token concentration (last) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, rows in runs.items():
        diag = [r for r in rows if "expert_overlap" in r]
        print(f"| {variant} | {rows[-1]['loss']:.3f} | {diag[-1]['val_loss']:.3f} | "
              f"{layer_mean(diag[0], 'expert_overlap'):.3f} | {last(diag, 'expert_overlap')} | "
              f"{last(diag, 'unique_overlap')} | {last(diag, 'unique_off_complement')} | {last(diag, 'grad_alignment')} | "
              f"{layer_mean(diag[-1], 'router_specificity'):.2f} | {last(diag, 'val_token_concentration')} |")


if __name__ == "__main__":
    main()
