"""Directories of safetensors shards with a Hugging Face-style index (`model.safetensors.index.json`),
written a group of tensors (a layer) at a time and read a tensor at a time, so memory holds one
group, not the model. Both directions of conversion and `model.init_from` use them.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_sdmoe.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"  # a model small enough for one file, as transformers writes it


class ShardWriter:
    """One shard file per `add`, then the index."""

    def __init__(self, out_dir: Path):
        self.dir, self.weight_map, self.total_size = out_dir, {}, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        write_safetensors(self.dir / name, tensors)
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))


DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # FP8 checkpoints (convert/fp8.py)
_DTYPE_OF = {code: dtype for dtype, code in DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format, written tensor by tensor from the tensors' own memory. Written by
    hand because safetensors' save_file first copies every tensor into bytes (measured: peak
    memory three times a group of expert weights instead of once)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))


class WeightDirectory:
    """Whole tensors by name from a directory of shards (with an index, or one model.safetensors)."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise UserError(f"weights directory {self.dir} not found: give a directory of safetensors weights "
                            "(sdmoe-convert from-hf writes one)")
        if (self.dir / INDEX).is_file():
            try:
                self.weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
                if not isinstance(self.weight_map, dict):
                    raise TypeError("its weight_map is no mapping of names to files")
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.dir / INDEX} is not a readable index ({type(e).__name__}: {e}): copy the "
                                "model directory again") from None
        elif (self.dir / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        else:
            raise UserError(f"{self.dir} holds no {INDEX} or {SINGLE}: give a directory of safetensors weights")
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise UserError(f"{self.dir / INDEX} names shard {missing[0]}, which is missing: copy the whole "
                            "model directory")
        self._files: dict[str, object] = {}

    def _open(self, file: str):
        try:
            return safe_open(str(self.dir / file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.dir / file} is not a readable safetensors file ({e}): it may be truncated; "
                            "copy it again")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = self._open(file)
        return self._files[file]

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._file(name).get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{self.dir / self.weight_map[name]}: reading {name} failed ({e}): the file may be "
                            "truncated; copy it again")

    def placeholder(self, name: str) -> torch.Tensor:
        """A data-less (meta) tensor of `name`'s shape and dtype, from the file's header alone."""
        header = self._file(name).get_slice(name)
        return torch.empty(header.get_shape(), dtype=_DTYPE_OF[header.get_dtype()], device="meta")
