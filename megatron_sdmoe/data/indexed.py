"""Writer for Megatron's .bin/.idx token format (read back by megatron's IndexedDataset)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


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
