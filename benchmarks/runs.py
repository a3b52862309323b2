"""Shared by the benchmarks: train through the real entry point and read back metrics.jsonl."""
import json
import os
import subprocess
import sys
from pathlib import Path


def train(config: str, overrides: list[str], run_dir: Path) -> list[dict]:
    subprocess.run([sys.executable, "-m", "megatron_sdmoe.train", config, *overrides, f"run.dir={run_dir}",
                    "train.save_interval=0", "train.final_checkpoint=false"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
