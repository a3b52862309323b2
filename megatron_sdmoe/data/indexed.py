"""Writer and checker for Megatron's .bin/.idx token format (read by megatron's IndexedDataset)."""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder, _IndexReader

from megatron_sdmoe.errors import UserError

# .idx header: magic (9 bytes), version (8), dtype code (1), sequence count (8), document count (8).
IDX_HEADER_BYTES = 34


def repeated_file(paths: Sequence[str], suffix: str = "") -> str | None:
    """The first of `paths` whose file (path + suffix) came before it, also under another name (./, a
    symlink, a hard link); a missing file counts by its resolved path."""
    seen = set()
    for path in paths:
        try:
            stat = os.stat(path + suffix)
            identity: object = (stat.st_dev, stat.st_ino)
        except OSError:
            identity = os.path.realpath(path + suffix)
        if identity in seen:
            return path
        seen.add(identity)
    return None


def write_indexed(prefix: str, docs: Iterable[Sequence[int]], vocab_size: int) -> None:
    """Write `prefix`.bin and `prefix`.idx with one item (one sequence) per document."""
    dtype = DType.optimal_dtype(vocab_size)  # uint16 below 65500 ids, else int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in docs:
        arr = np.asarray(ids, dtype=np.int64)
        # A narrow dtype would silently wrap out-of-range ids.
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}) while writing {prefix}")
        builder.add_item(torch.from_numpy(arr))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def open_checked(prefix: str) -> IndexedDataset:
    """megatron-core's IndexedDataset over `prefix`, after checking that its .idx describes its .bin.

    Megatron's reader trusts the index: a .bin that is truncated or belongs to another index is
    only noticed, if ever, as garbage tokens in training. Raises UserError on any mismatch.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: give the prefix of an existing .bin/.idx pair (without the "
                            "extension)")
    index = _read_index(prefix)
    lengths = index.sequence_lengths.astype(np.int64)
    pointers, bounds, itemsize = index.sequence_pointers, index.document_indices, index.dtype_size
    idx_bytes, bin_bytes = os.path.getsize(idx), os.path.getsize(bin_)
    starts = (np.cumsum(lengths) - lengths) * itemsize  # where each sequence begins in a consistent .bin
    expected_idx = IDX_HEADER_BYTES + len(lengths) * (4 + 8) + len(bounds) * 8
    problem = None
    if idx_bytes not in (expected_idx, expected_idx + len(lengths)):  # + one mode byte per sequence if multimodal
        problem = (f"the .idx has {idx_bytes} bytes where {len(lengths)} sequences and {len(bounds)} document "
                   f"boundaries take {expected_idx}")
    elif (lengths < 0).any():
        problem = "it lists negative sequence lengths"
    elif lengths.sum() * itemsize != bin_bytes:
        problem = _size_problem(int(lengths.sum()), itemsize, bin_bytes)
    elif not np.array_equal(pointers, starts):
        first = int(np.argmax(pointers != starts))
        problem = f"sequence {first} starts at byte {pointers[first]} instead of {starts[first]}"
    elif not len(bounds) or bounds[0] != 0 or bounds[-1] != len(lengths) or (np.diff(bounds) < 0).any():
        problem = f"its document boundaries do not run from sequence 0 to sequence {len(lengths)} in order"
    if problem:
        raise _mismatch(prefix, problem)
    return IndexedDataset(prefix)


def open_indexed(prefix: str) -> IndexedDataset:
    """megatron-core's IndexedDataset over `prefix`, a damaged .idx or one without documents refused
    in one line (megatron's reader fails on them with a traceback)."""
    _read_index(prefix)
    return IndexedDataset(prefix)


def _read_index(prefix: str) -> _IndexReader:
    idx = prefix + ".idx"
    try:
        index = _IndexReader(idx, multimodal=False)
    except (AssertionError, ValueError, struct.error) as e:  # bad magic or version, dtype code, truncation
        raise UserError(f"{idx} is not a readable Megatron index ({e or type(e).__name__}): re-create it with "
                        "sdmoe-preprocess") from e
    if not len(index.sequence_lengths):  # megatron cannot map its empty .bin
        raise UserError(f"{prefix} holds no documents: leave it out, or re-create it from input with text")
    return index


def check_bin_size(prefix: str, dataset: IndexedDataset) -> None:
    """open_checked's cheapest check, for a dataset already open: the .bin holds exactly the tokens
    the .idx lists (a truncated copy, or a .bin of another index, fails it)."""
    tokens, itemsize = int(dataset.sequence_lengths.sum(dtype=np.int64)), dataset.index.dtype_size
    bin_bytes = os.path.getsize(prefix + ".bin")
    if tokens * itemsize != bin_bytes:
        raise _mismatch(prefix, _size_problem(tokens, itemsize, bin_bytes))


def check_token_ids(prefix: str, vocab: int, head: int = 2 ** 20) -> None:
    """Refuse a corpus whose first `head` tokens hold an id the model has no embedding row for: it
    was tokenized with another tokenizer (training would fail at the embedding, on a GPU as a
    device-side assert). The head alone is read, so that a huge corpus costs nothing at start-up."""
    tokens = np.memmap(prefix + ".bin", dtype=_read_index(prefix).dtype, mode="r")[:head]
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= vocab:
        raise UserError(f"{prefix}.bin holds token id {largest}, but the model's vocabulary (data.tokenizer's, or "
                        f"model.vocab_size) has {vocab} ids: the corpus was tokenized with another tokenizer; "
                        "set data.tokenizer to that one, or preprocess the corpus with this one")


def _size_problem(tokens: int, itemsize: int, bin_bytes: int) -> str:
    return f"its sequence lengths add up to {tokens} tokens of {itemsize} bytes, but the .bin has {bin_bytes} bytes"


def _mismatch(prefix: str, problem: str) -> UserError:
    return UserError(f"{prefix}.idx does not match {prefix}.bin: {problem}: re-create both with sdmoe-preprocess, or "
                     "restore the pair from the same run")
