"""Shared by the benchmarks: train through the real entry point and read back metrics.jsonl."""
import json
import os
import subprocess
import sys
from pathlib import Path


def train(config: str, overrides: list[str], run_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "megatron_sdmoe.train", config, "train.save_interval=0",
                           "train.final_checkpoint=false", *overrides, f"run.dir={run_dir}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:  # the training's own last words, not only its exit code
        sys.exit(f"training failed (exit {done.returncode}): {' '.join(overrides)}\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
