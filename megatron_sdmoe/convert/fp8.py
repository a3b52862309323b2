"""Block-quantised FP8 checkpoints, the format DeepSeek-V3 and R1 are released in: each linear
weight is float8 (e4m3) with a float32 `<name>_scale_inv` per block of `weight_block_size`
(128 x 128) rows x columns, the weight being fp8 value x its block's scale. `from-hf` reads them
as full-precision tensors, dequantised one tensor at a time as the conversion streams them.

Written here because transformers dequantises only inside `from_pretrained` (its FP8 quantizer's
load operation), which builds the whole model in memory; the arithmetic is the same (the tests
compare with it), and a last block may be partial, as in DeepSeek-V3's 576-row key/value
projection, where transformers requires whole blocks.
"""
from __future__ import annotations

import torch

from megatron_sdmoe.convert.weights import WeightDirectory
from megatron_sdmoe.errors import UserError

SCALE_SUFFIX = "_scale_inv"


def block_size(hf) -> tuple[int, int] | None:
    """The (rows, columns) of a block-wise FP8 config's quantisation blocks; None for any other."""
    quantization = getattr(hf, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    block = quantization.get("weight_block_size")
    return tuple(block) if quantization.get("quant_method") == "fp8" and block and len(block) == 2 else None


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """weight [m, n] (fp8) x scale [ceil(m / block rows), ceil(n / block columns)], in fp32, as `dtype`."""
    rows, cols = weight.shape
    if scale.shape != (-(-rows // block[0]), -(-cols // block[1])):
        raise UserError(f"a weight of shape {list(weight.shape)} has scales of shape {list(scale.shape)}, not one per "
                        f"{block[0]} x {block[1]} block (quantization_config.weight_block_size): the checkpoint "
                        "is damaged or another format; convert an unquantised one")
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * full).to(dtype)


class DequantizedWeights:
    """A WeightDirectory of a block-wise FP8 checkpoint whose quantised weights read as `dtype`
    tensors; their scales are not names of their own."""

    def __init__(self, source: WeightDirectory, block: tuple[int, int], dtype: torch.dtype):
        self.source, self.block, self.dtype = source, block, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.source and not name.endswith(SCALE_SUFFIX)

    def names(self) -> list[str]:
        return [name for name in self.source.names() if not name.endswith(SCALE_SUFFIX)]

    def _quantised(self, name: str) -> bool:
        return name + SCALE_SUFFIX in self.source

    def tensor(self, name: str) -> torch.Tensor:
        weight = self.source.tensor(name)
        if not self._quantised(name):
            return weight
        return dequantize(weight, self.source.tensor(name + SCALE_SUFFIX), self.block, self.dtype)

    def placeholder(self, name: str) -> torch.Tensor:
        shape = self.source.placeholder(name)
        return shape.to(self.dtype) if self._quantised(name) else shape
