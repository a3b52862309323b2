"""Continual training through four text domains: does head-wise routing forget less than a flat
MoE of the same budget? (docs/methods.md sections 2-4)

The stages, in order, all built from what this machine has installed and tokenized with the
sample corpus' tokenizer: the standard library's docstrings (English technical prose), its Python
source (top-level functions and classes), CPython's C headers, and the installed packages'
READMEs (Markdown). The flat MoE (configs/tiny-qwen3-moe.yaml) and the head-wise one
(configs/tiny-headwise.yaml: the same total and active expert parameters) train through the same
stages with the same seed. After each stage every seen stage's validation loss is evaluated: the
matrix L[i][j] and BWT = mean_{j<n} (L[n][j] - L[j][j]) (positive: forgetting), and N_eff of the
routes over every seen stage's validation tokens labelled by stage.

    .venv/bin/python benchmarks/forgetting.py [--steps-per-stage 100] [--out benchmarks/results/forgetting.png]
"""
import argparse
import ast
import importlib.metadata
import json
import sysconfig
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runs import train  # noqa: E402

from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer, sample_documents, write_indexed  # noqa: E402
from megatron_sdmoe.data.sample_corpus import stdlib_sources  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {"flat": REPO / "configs" / "tiny-qwen3-moe.yaml", "head-wise": REPO / "configs" / "tiny-headwise.yaml"}
CHUNK_LINES = 60  # C headers are cut into documents of this many lines


def python_source() -> list[str]:
    docs = []
    for path in stdlib_sources():
        text = path.read_text(errors="replace")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
        docs += [ast.get_source_segment(text, node) or "" for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    return [d for d in docs if len(d) >= 200]


def c_headers() -> list[str]:
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["include"]).rglob("*.h")):
        lines = path.read_text(errors="replace").splitlines()
        docs += ["\n".join(lines[i:i + CHUNK_LINES]) for i in range(0, len(lines), CHUNK_LINES)]
    return [d for d in docs if len(d) >= 200]


def package_readmes() -> list[str]:
    readmes = {dist.metadata.get_payload() or "" for dist in importlib.metadata.distributions()}
    return sorted(r for r in readmes if len(r) >= 200)


DOMAINS = {"docstrings": sample_documents, "python": python_source, "c_headers": c_headers,
           "readmes": package_readmes}


def build_domains(root: Path, tokenizer_dir: str) -> dict[str, str]:
    tok = load_tokenizer(tokenizer_dir)
    prefixes = {}
    for name, documents in DOMAINS.items():
        prefixes[name] = str(root / name)
        docs = documents()
        write_indexed(prefixes[name], ([*tok.tokenize(d), tok.eod] for d in docs), tok.vocab_size)
        print(f"{name}: {len(docs)} documents")
    return prefixes


def run(model: str, prefixes: dict[str, str], tokenizer_dir: str, steps: int, run_dir: Path) -> dict:
    stages = [{"name": name, "path": [prefix], "steps": steps} for name, prefix in prefixes.items()]
    rows = train(str(MODELS[model]), [f"data.stages={json.dumps(stages)}", f"data.tokenizer={tokenizer_dir}",
                                      f"train.max_steps={steps * len(stages)}", f"moe.diag_interval={steps}",
                                      "train.eval_interval=0", f"train.log_interval={steps}"], run_dir)
    matrix = json.loads((run_dir / "stages.json").read_text())
    neff = [r["stage_route_neff"] for r in rows if "stage_route_neff" in r]
    return {"loss": matrix["loss"], "bwt": matrix["bwt"], "neff": [sum(n) / len(n) for n in neff]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-stage", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/forgetting.png")
    args = parser.parse_args()
    tokenizer_dir = ensure_sample_corpus().tokenizer_dir
    with tempfile.TemporaryDirectory() as tmp:
        prefixes = build_domains(Path(tmp), tokenizer_dir)
        results = {model: run(model, prefixes, tokenizer_dir, args.steps_per_stage, Path(tmp) / model)
                   for model in MODELS}
    names = list(DOMAINS)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (model, result) in zip(axes, results.items()):
        n = len(result["loss"])
        grid = [row + [float("nan")] * (n - len(row)) for row in result["loss"]]
        image = ax.imshow(grid, cmap="viridis")
        for i, row in enumerate(result["loss"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set(xticks=range(n), xticklabels=names, yticks=range(n), yticklabels=[f"after {s}" for s in names],
               title=f"{model}: validation loss L[i][j]\nBWT {result['bwt']:+.3f}")
        ax.tick_params(axis="x", rotation=30)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for model, result in results.items():
        axes[2].plot(range(1, len(result["neff"]) + 1), result["neff"], "o-", label=model)
    axes[2].set(xlabel="stages seen", ylabel="N_eff (mean over layers)", title="route composition over seen stages",
                xticks=range(1, len(names) + 1))
    axes[2].legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}\n")
    print("| model | BWT | mean final loss | " + " | ".join(f"L[{names[-1]}][{n}] - L[{n}][{n}]" for n in names[:-1])
          + " | N_eff after each stage |\n|" + " --- |" * (len(names) + 3))
    for model, r in results.items():
        last, diag = r["loss"][-1], [r["loss"][j][j] for j in range(len(names))]
        print(f"| {model} | {r['bwt']:+.3f} | {sum(last) / len(last):.3f} | "
              + " | ".join(f"{last[j] - diag[j]:+.3f}" for j in range(len(names) - 1))
              + " | " + ", ".join(f"{n:.2f}" for n in r["neff"]) + " |")


if __name__ == "__main__":
    main()
