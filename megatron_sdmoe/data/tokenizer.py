"""Tokenizer: a local Hugging Face tokenizer directory, shaped for megatron.core.datasets.

GPTDatasetConfig reads `vocab_size`, `eod` and `pad`; MegatronDataset hashes `unique_identifiers`
into the name of its index cache, so a different tokenizer never reuses another's indices.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from megatron_sdmoe.errors import UserError

# megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID: an id that never occurs in the data.
NO_PAD = -1


class Tokenizer:
    """Adapter over a Hugging Face tokenizer with the attributes megatron-core's datasets use."""

    def __init__(self, hf: PreTrainedTokenizerBase, directory: str) -> None:
        if hf.eos_token_id is None:
            raise UserError(f"tokenizer {directory} has no end-of-sequence token: set eos_token in its "
                            "tokenizer_config.json (documents are separated by it)")
        self.hf = hf
        self.directory = directory
        self.vocab_size: int = len(hf)  # includes added special tokens
        self.eod: int = hf.eos_token_id
        self.unique_identifiers = {"class": type(self).__name__, "directory": directory,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def pad(self) -> int:
        # GPTDataset zeroes the loss wherever labels == pad. A pad id shared with a real token
        # (often pad == eos) would drop that token from the loss, so it is reported as absent.
        pad = self.hf.pad_token_id
        shared = {self.eod, self.hf.bos_token_id, self.hf.unk_token_id}
        return NO_PAD if pad is None or pad in shared else pad

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False, verbose=False)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Same ids as `tokenize` per text; the Rust backend encodes the batch in parallel."""
        return self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer from a local directory (never from the Hub)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "not found"
        raise UserError(f"tokenizer directory {directory} {what}: set data.tokenizer to a local Hugging Face "
                        "tokenizer directory (holding tokenizer.json / tokenizer_config.json)")
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for bad directories
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer directory {directory} could not be loaded ({reason}): point "
                        "data.tokenizer at a directory saved with save_pretrained()") from e
    return Tokenizer(hf, str(path.resolve()))
