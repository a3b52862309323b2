"""sdmoe-data: look into Megatron .bin/.idx pairs.

    sdmoe-data inspect PREFIX [--tokenizer DIR]   counts, dtype and (with a tokenizer) the start of document 0
    sdmoe-data check PREFIX...                    verify that each .idx describes its .bin
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np

from megatron_sdmoe.data.indexed import open_checked
from megatron_sdmoe.data.preprocess import load_cli_tokenizer
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input, positive_int


def describe(prefix: str, tokenizer_dir: str | None, sample_tokens: int) -> list[str]:
    dataset = open_checked(prefix)
    bounds, lengths = dataset.document_indices, dataset.sequence_lengths
    ends = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))  # token offset of each sequence boundary
    doc_tokens = ends[bounds[1:]] - ends[bounds[:-1]]
    dtype = dataset.index.dtype
    lines = [f"prefix     {prefix}",
             f"documents  {len(doc_tokens):,}",
             f"sequences  {len(lengths):,}",
             f"tokens     {int(ends[-1]):,}" + (f" (per document: mean {doc_tokens.mean():,.1f}, longest "
                                                 f"{doc_tokens.max():,})" if len(doc_tokens) else ""),
             f"dtype      {dtype.__name__} ({dtype().itemsize} bytes per token)"]
    if tokenizer_dir and len(doc_tokens) and doc_tokens[0]:
        first = np.concatenate(dataset[int(bounds[0]):int(bounds[1])])
        text = load_cli_tokenizer(tokenizer_dir).detokenize(first[:sample_tokens].tolist())
        lines.append(f"sample     document 0, first {min(sample_tokens, len(first)):,} of {len(first):,} tokens: "
                     f"{text!r}")
    return lines


def check(prefix: str) -> str:
    dataset = open_checked(prefix)
    return (f"ok: {prefix}: .idx matches .bin ({len(dataset.document_indices) - 1:,} documents, {len(dataset):,} "
            f"sequences, {int(dataset.sequence_lengths.sum()):,} tokens, {dataset.index.dtype.__name__})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="sdmoe-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    describe_cmd = commands.add_parser("inspect", help="counts, dtype and a decoded sample")
    describe_cmd.add_argument("prefix", help=".bin/.idx prefix (without the extension)")
    describe_cmd.add_argument("--tokenizer", help="local Hugging Face tokenizer directory, to decode a sample")
    describe_cmd.add_argument("--sample-tokens", type=positive_int, default=64,
                              help="tokens of document 0 to decode (default 64)")
    check_cmd = commands.add_parser("check", help="verify that each .idx describes its .bin")
    check_cmd.add_argument("prefixes", nargs="+", metavar="prefix", help=".bin/.idx prefix (without the extension)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # megatron-core warns on every index it opens outside torch.distributed; this tool never uses it.
    warnings.filterwarnings("ignore", message="Could not determine rank")
    try:
        if args.command == "inspect":
            print("\n".join(describe(args.prefix, args.tokenizer, args.sample_tokens)))
        else:
            for prefix in args.prefixes:
                print(check(prefix))
    except UserError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
