"""Time to resume a checkpoint in its own layout and in others (training/reshard.py).

Trains one step of the Qwen3-like MoE of convert_memory.py (about 400M parameters, fp32) at EP2 in
two processes, then resumes a fresh copy of that run in each layout below, for no further step,
and prints the load time each start line reports: "loaded in" (the same layout: every rank reads
its own file) or "re-cut in" (another layout: every tensor assembled whole and cut again).

    .venv/bin/python benchmarks/relayout.py [key=value ...]
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory import MODEL, REPO  # noqa: E402  (the same model)

LAYOUTS = {"EP2 (saved)": ["parallel.expert=2"], "TP2": ["parallel.tensor=2"], "EP1 DP2": [],
           "TP2 x ETP2": ["parallel.tensor=2", "parallel.expert_tensor=2"]}


def train(run: Path, layout: list[str], overrides: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "megatron_sdmoe.train", str(REPO / "configs" / "tiny-qwen3-moe.yaml"), f"run.dir={run}",
                           *MODEL, *layout, *overrides], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        sys.exit(f"training failed (exit {done.returncode}): {' '.join(layout)}\n{done.stderr[-4000:]}")
    return done.stdout


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved"
        train(saved, LAYOUTS["EP2 (saved)"], overrides)
        size = sum(f.stat().st_size for f in (saved / "checkpoints").rglob("*.pt")) / 2**30
        print(f"checkpoint: {size:.2f} GiB ({len(list((saved / 'checkpoints').rglob('rank_*.pt')))} rank files)")
        for name, layout in LAYOUTS.items():
            run = Path(tmp) / "run"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(saved, run)
            line = train(run, layout, [*overrides, "train.final_checkpoint=false"])
            took = re.search(r"\((?:saved in [^:]+: )?(?:loaded|re-cut) in ([\d.]+) s\)", line)
            print(f"{name}: {took.group(0) if took else 'no resume line: ' + line[-400:]}")


if __name__ == "__main__":
    main()
