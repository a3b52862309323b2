"""sdmoe-preprocess throughput with 1 and 2 workers on a synthetic .jsonl corpus of at least 100 MB.

The corpus is the sample corpus' documents (stdlib docstrings), repeated, each pass shuffled, until
it reaches --size-mb; it is built once into --workdir and reused. It is tokenized with the sample
tokenizer. Every worker is one process with one thread (sdmoe-preprocess sets
TOKENIZERS_PARALLELISM=false, so the tokenizers library starts no threads of its own), so the runs
compare 1 and 2 cores. Rates are the tool's own (reading, tokenizing, writing; not its start-up);
CPU seconds are those of the whole run (start-up included) over all its processes: on a machine
shared with other work, they show whether a speed-up below the worker count comes from the tool or
from cores it did not get.

    .venv/bin/python benchmarks/preprocess.py [--workdir /tmp] [--size-mb 100] [--workers 1 2]
"""
import argparse
import filecmp
import json
import os
import random
import re
import resource
import subprocess
import sys
from pathlib import Path

from megatron_sdmoe.data import ensure_sample_corpus, sample_documents

SUMMARY = re.compile(r"done: ([\d,]+) documents, ([\d,]+) tokens in ([\d.]+) s")


def build_corpus(path: Path, size_mb: int) -> None:
    docs, rng = sample_documents(), random.Random(0)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w") as f:
        while written < size_mb * 1e6:
            rng.shuffle(docs)
            for doc in docs:
                written += f.write(json.dumps({"text": doc}) + "\n")
    tmp.rename(path)  # only a finished corpus is ever reused


def run(corpus: Path, prefix: Path, tokenizer: str, workers: int) -> tuple[int, int, float, float]:
    """(documents, tokens, seconds) from sdmoe-preprocess's summary line, and the run's CPU seconds."""
    cmd = [sys.executable, "-m", "megatron_sdmoe.data.preprocess", "--input", str(corpus), "--output-prefix",
           str(prefix), "--tokenizer", tokenizer, "--workers", str(workers), "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers, which the tool waits for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    documents, tokens, seconds = SUMMARY.search(proc.stdout).groups()
    return int(documents.replace(",", "")), int(tokens.replace(",", "")), float(seconds), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp", help="where the corpus is cached and outputs are written")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    work = Path(args.workdir) / "sdmoe-preprocess-bench"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.size_mb}mb.jsonl"
    if not corpus.exists():
        build_corpus(corpus, args.size_mb)
    tokenizer = ensure_sample_corpus().tokenizer_dir
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.0f} MB), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} before the runs")
    print("| workers | documents | tokens | seconds | documents/s | tokens/s | speed-up | CPU s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    outputs, base = [], None
    for workers in args.workers:
        prefix = work / f"out-w{workers}"
        documents, tokens, seconds, cpu = run(corpus, prefix, tokenizer, workers)
        base = base or seconds
        print(f"| {workers} | {documents:,} | {tokens:,} | {seconds:.1f} | {documents / seconds:,.0f} | "
              f"{tokens / seconds:,.0f} | {base / seconds:.2f} | {cpu:.0f} |", flush=True)
        outputs.append(Path(f"{prefix}_text_document"))
    same = all(filecmp.cmp(f"{outputs[0]}{ext}", f"{out}{ext}", shallow=False)
               for out in outputs[1:] for ext in (".bin", ".idx"))
    print(f"outputs identical across worker counts: {same}; load average {os.getloadavg()[0]:.1f} after the runs")
    for out in outputs:
        for ext in (".bin", ".idx"):
            os.remove(f"{out}{ext}")


if __name__ == "__main__":
    main()
