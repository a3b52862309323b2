"""Peak memory of `sdmoe-convert to-hf`, and of `from-hf` back, on a checkpoint of at least 1 GB,
against its largest layer.

Trains one step of a Qwen3-like MoE of about 400M parameters (fp32, EP2 on the CPU) to get a
checkpoint, then converts it to transformers' format and that export back, in this process, while a
thread samples the process's anonymous resident memory (RssAnon: what conversion allocates; the
memory-mapped shards are file pages, reclaimable, and not counted), and prints each peak over the
value before that conversion next to the largest layer's size. transformers and the tokenizer are
loaded first: they cost the same whatever the model's size.

    .venv/bin/python benchmarks/convert_memory.py [--nproc 2] [key=value ...]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden_size=1024", "model.num_layers=8", "model.num_attention_heads=16", "model.num_query_groups=4",
         "moe.num_experts=32", "moe.topk=4", "moe.ffn_hidden_size=512", "data.seq_length=64",
         "train.global_batch_size=2", "train.micro_batch_size=1", "train.max_steps=1", "train.eval_interval=0",
         "train.eval_samples=0", "train.precision=fp32"]


def anon_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, anon_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, anon_bytes())
            time.sleep(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import transformers  # noqa: F401  (a fixed cost, loaded before measuring)

    from megatron_sdmoe.convert.checkpoint_reader import CheckpointReader
    from megatron_sdmoe.convert.cli import from_hf, to_hf
    from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer

    load_tokenizer(ensure_sample_corpus().tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.nproc}", "-m", "megatron_sdmoe.train",
                        str(REPO / "configs" / "tiny-qwen3-moe.yaml"), f"run.dir={run}", *MODEL,
                        f"parallel.expert={args.nproc}", *args.overrides],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        reader = CheckpointReader(run)
        layers: dict[str, int] = {}
        for name in reader.names():
            match = re.match(r"decoder\.layers\.\d+", name)
            if match:
                layers[match.group(0)] = layers.get(match.group(0), 0) + reader.tensor(name).nbytes
        total = sum(reader.tensor(name).nbytes for name in reader.names())
        del reader
        largest, gib = max(layers.values()), 2**30
        print(f"model tensors {total / gib:.2f} GiB | largest layer {largest / gib:.3f} GiB")
        for direction, convert in (("to-hf", lambda: to_hf(str(run), Path(tmp) / "hf")),
                                   ("from-hf", lambda: from_hf(str(Path(tmp) / "hf"), Path(tmp) / "back", []))):
            before = anon_bytes()
            sampler = PeakSampler()
            sampler.start()
            start = time.perf_counter()
            convert()
            seconds = time.perf_counter() - start
            sampler.running = False
            sampler.join()
            peak = sampler.peak - before
            print(f"{direction}: peak (RssAnon over start) {peak / gib:.3f} GiB = {peak / largest:.2f}x the largest "
                  f"layer | {seconds:.1f} s")


if __name__ == "__main__":
    main()
