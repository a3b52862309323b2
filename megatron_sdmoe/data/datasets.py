"""Train/validation datasets from megatron.core.datasets (GPTDataset, blended and cached)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import megatron.core.datasets
import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                    parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from torch.utils.data import Dataset, Subset

from megatron_sdmoe.config import Config
from megatron_sdmoe.data.indexed import check_bin_size, open_indexed, repeated_file
from megatron_sdmoe.data.sample_corpus import ensure_sample_corpus
from megatron_sdmoe.data.tokenizer import Tokenizer
from megatron_sdmoe.errors import RankError, UserError, seen_on, writing_into
from megatron_sdmoe.validation import check_split

BATCH_DTYPES = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64}


def parse_blend(path_list: list, setting: str = "data.path") -> tuple[list[str], list[float] | None]:
    """A blend -> (prefixes, weights): [prefix] or [w1, prefix1, w2, prefix2, ...]; errors name it
    as `setting`."""
    if len(path_list) == 1:
        pairs = [(None, path_list[0])]
    elif len(path_list) % 2 == 0 and path_list:
        pairs = list(zip(path_list[0::2], path_list[1::2]))
    else:
        raise UserError(f"{setting} has {len(path_list)} entries: give one prefix, or weight/prefix pairs "
                        "[w1, prefix1, w2, prefix2, ...]")
    prefixes, weights = [], []
    for weight, prefix in pairs:
        if weight is not None:
            weights.append(_weight(weight, prefix, setting))
        prefixes.append(_prefix(prefix, setting))
    twice = repeated_file(prefixes, ".bin")
    if twice:  # megatron would draw the same samples from each copy, in the same order
        raise UserError(f"{twice} appears twice in {setting}: give it once, with its weights summed")
    return prefixes, (weights if weights else None)


def _weight(weight: object, prefix: object, setting: str) -> float:
    try:
        w = float(weight) if not isinstance(weight, bool) else math.nan
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w <= 0:
        raise UserError(f"{setting} weight {weight!r} (for {prefix!r}) is not a positive number: "
                        f"write {setting} as [w1, prefix1, w2, prefix2, ...] with weights > 0")
    return w


def _prefix(prefix: object, setting: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise UserError(f"{setting} entry {prefix!r} is not a path prefix: write {setting} as [prefix] or "
                        "[w1, prefix1, w2, prefix2, ...]")
    path = os.path.expanduser(prefix)
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(path + ext)]
    if missing:
        hint = (" (give the prefix without the extension)" if path.endswith((".bin", ".idx"))
                else " (tokenize the corpus into Megatron .bin/.idx files first)")
        raise UserError(f"{setting} prefix {prefix} has no {' or '.join(path + m for m in missing)}: "
                        f"give the prefix of an existing .bin/.idx pair{hint}")
    return path


def _require_helpers() -> None:
    # Megatron imports its compiled index builders only mid-build; fail before, with the fix.
    try:
        from megatron.core.datasets import helpers  # noqa: F401
    except ImportError as e:
        source = os.path.dirname(megatron.core.datasets.__file__)
        raise UserError(f"megatron-core's compiled dataset helpers do not load ({e}): reinstall "
                        f"megatron-core==0.19.2 from its wheel or build them with `make -C {source}`") from e


@contextmanager
def _single_process_is_fine():
    # A single process is a supported layout: megatron's "defaulting to rank 0" warning is right there.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not determine rank")
        yield


def sample_corpus_prefix(tokenizer_dir: str | None) -> str:
    """The built-in corpus's prefix (data.path empty), refused with another tokenizer than its own."""
    corpus = ensure_sample_corpus()
    if tokenizer_dir and Path(tokenizer_dir).resolve() != Path(corpus.tokenizer_dir).resolve():
        raise UserError(f"data.path is empty (the built-in sample corpus) but the tokenizer is {tokenizer_dir}: set "
                        "data.path to a corpus tokenized with it, or drop data.tokenizer")
    return corpus.prefix


def checked_blends(cfg: Config, path: list, valid_path: list, test_path: list, num_train_samples: int,
                   num_eval_samples: int, section: str = "data") -> tuple[tuple, tuple | None, tuple | None]:
    """The blend `path` and the validation and test blends `valid_path` and `test_path` (None if
    empty) of the config section `section` (data, or data.stages[i]) parsed, refused when their
    files cannot give whole samples: each split that is read (with separate blends, each prefix)
    must hold at least one sequence + 1 tokens, or megatron fills every sample by repeating those
    few tokens (and, with none at all, loops forever adding epochs). The validation and test sets
    are read when `num_eval_samples` > 0, data.split's test set when it has a weight; and refused
    when a .bin does not hold the tokens its .idx lists (a copy cut short), or when megatron-core's
    index of a split would not fit in memory (`num_train_samples`, `num_eval_samples` drawn from it:
    a typo's extra zeros in train.max_steps would otherwise hang in megatron's epoch count). Reads
    only the .idx files (and the size of each .bin)."""
    check_split(cfg.data.split)
    blend, valid_blend, test_blend = (parse_blend(p, f"{section}.{key}") if p else None
                                      for p, key in ((path, "path"), (valid_path, "valid_path"),
                                                     (test_path, "test_path")))
    samples = {"train": num_train_samples, "validation": num_eval_samples, "test": num_eval_samples}
    if valid_blend:
        evaluated = [("validation", valid_blend), ("test", test_blend)] if num_eval_samples else []
        separate = [("train", blend), *evaluated]
        parts = [(name, prefix, (0.0, 1.0), share) for name, other in separate if other
                 for prefix, share in zip(other[0], _shares(other))]
    else:
        split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.data.split))
        names = ["train", "validation"][:1 + bool(num_eval_samples)]
        for name, bounds in zip(names, split_matrix):
            if bounds is None:
                raise UserError(f"data.split={cfg.data.split!r} gives the {name} set no documents: give it a weight "
                                "(e.g. 98,2,0)" + (", or set train.eval_samples=0 (no evaluation)"
                                                   if name == "validation" and not cfg.data.stages else ""))
        if num_eval_samples and split_matrix[2] is not None:
            names.append("test")
        parts = [(name, prefix, bounds, share) for prefix, share in zip(blend[0], _shares(blend))
                 for name, bounds in zip(names, split_matrix)]
    need = cfg.data.seq_length + 1  # a sample's tokens and the label after the last
    opened = {}
    for name, prefix, bounds, share in parts:
        if prefix not in opened:
            with _single_process_is_fine():
                opened[prefix] = open_indexed(prefix)  # kept referenced: its arrays view an mmap closed on deletion
            check_bin_size(prefix, opened[prefix])
            if cfg.data.document_mask and len(opened[prefix].document_indices) <= len(opened[prefix]):
                raise UserError(f"data.document_mask with {prefix}, whose documents are split into sentences "
                                "(sdmoe-preprocess --split-sentences): megatron-core's GPTDataset takes each "
                                "sentence for a document, so tokens would attend only within their sentence: "
                                "tokenize the corpus without --split-sentences, or drop data.document_mask")
        dataset = opened[prefix]
        beg, end = (int(round(b * len(dataset.sequence_lengths))) for b in bounds)  # megatron's rounding
        tokens = int(dataset.sequence_lengths[beg:end].sum())
        if tokens < need:
            fix = "a larger corpus or a lower data.seq_length" + (
                "" if valid_blend else f", or give the {name} split a larger weight in data.split")
            raise UserError(f"the {name} split of {prefix} holds {tokens} tokens ({end - beg} documents), fewer "
                            f"than one sample (data.seq_length + 1 = {need}): use {fix}")
        # megatron-core counts the passes one at a time, then indexes every document of each pass
        passes = math.ceil(samples[name] * share * cfg.data.seq_length / tokens)
        if passes > 1 and passes * (end - beg) > MAX_INDEXED_DOCUMENTS:
            raise UserError(f"{samples[name]:,} {name} samples would read the {name} split of {prefix} ({tokens:,} "
                            f"tokens) {passes:,} times, an index of {passes * (end - beg):,} documents: lower "
                            + ("train.max_steps or train.global_batch_size" if name == "train" else "train.eval_samples")
                            + ", or give a larger corpus")
    return blend, valid_blend, test_blend


BLEND_SURPLUS = 1.005  # megatron-core draws each blended dataset's share with half a percent to spare
MAX_INDEXED_DOCUMENTS = 2 ** 32  # 16 GiB of int32 document ids, then as many shuffled samples


def _shares(blend: tuple) -> list[float]:
    """Each prefix's share of a parsed blend's samples (megatron-core's surplus included)."""
    prefixes, weights = blend
    return [w / sum(weights) * BLEND_SURPLUS for w in weights] if weights else [1.0] * len(prefixes)


class Splits(NamedTuple):
    train: Dataset
    valid: Dataset | None
    test: Dataset | None  # data.split's (when it has a weight) or data.test_path's


def build_datasets(cfg: Config, tokenizer: Tokenizer, num_train_samples: int, num_eval_samples: int,
                   path: list | None = None, valid_path: list | None = None, test_path: list | None = None,
                   section: str = "data", stage: int = 0) -> Splits:
    """Train, validation and test datasets of exactly the requested lengths (validation and test:
    `num_eval_samples` each, None if 0; test also None without a weight or a blend) from the blend
    `path` (default data.path; empty: the sample corpus), split by data.split, or, when the
    separate blend `valid_path` (default data.valid_path) is given, trained on whole and validated
    and tested on `valid_path` and `test_path` (default data.test_path; empty: no test set).
    Errors name the blends as settings of the config section `section`. Each stage of data.stages
    (index `stage`) shuffles with a seed of its own (train.seed + stage): a corpus an earlier stage
    trained on is then drawn in another order, not replayed from the samples that stage began with.

    Must be called on every rank. Under torch.distributed, megatron's builder already builds each
    dataset on rank 0 first (writing the index cache), then barriers, then builds on the other
    ranks (reading the cache); without torch.distributed it builds in this process.
    """
    _require_helpers()
    path = cfg.data.path if path is None else path
    valid_path = cfg.data.valid_path if valid_path is None else valid_path
    test_path = cfg.data.test_path if test_path is None else test_path
    path = path or [sample_corpus_prefix(tokenizer.directory)]
    blend, valid_blend, test_blend = checked_blends(cfg, path, valid_path, test_path, num_train_samples,
                                                    num_eval_samples, section)
    cache = _cache_dir(cfg, [blend, valid_blend, test_blend])
    with _single_process_is_fine():
        config = GPTDatasetConfig(
            random_seed=(cfg.train.seed + stage) % 2 ** 32,
            sequence_length=cfg.data.seq_length,
            **({"blend_per_split": [blend, valid_blend, test_blend]} if valid_blend else
               {"blend": blend, "split": cfg.data.split}),
            path_to_cache=str(cache),
            tokenizer=tokenizer,
            reset_position_ids=False,  # with inter_document_masking megatron resets them all the same
            reset_attention_mask=False,
            eod_mask_loss=cfg.data.eod_mask_loss,  # loss_mask 0 where the input token is EOD
            create_attention_mask=False,  # attention kernels build the causal mask themselves
            inter_document_masking=cfg.data.document_mask,  # samples gain cu_seqlens: document boundaries
        )
        sizes = [num_train_samples, num_eval_samples, num_eval_samples]
        with _building_index_cache(cache, cfg):
            built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    # Megatron rounds sizes up (whole epochs, blend surplus); callers index [0, n) only. It builds
    # no dataset for a split without documents (a zero weight, or no test blend).
    return Splits(*(Subset(dataset, range(n)) if dataset is not None and n else None
                    for dataset, n in zip(built, sizes)))


@contextmanager
def _building_index_cache(cache: Path, cfg: Config):
    """Around megatron's build on the rank that writes the index cache (rank 0):
    - one builder at a time: jobs that share data.cache_dir (a sweep started at once) build the same
      files, which megatron writes in place, so one job's ranks could read a file another job is
      rewriting. An exclusive lock (flock) on the cache folder serialises them; the later job then
      finds the cache built. Where the filesystem has no locks (Lustre mounted without flock),
      builds go unlocked.
    - a write that fails (a full disk, a quota) is one line, and the files that build wrote are
      removed: megatron counts a cache as complete when every file exists, so a shuffle index cut
      short would be read by every later start (an error, or other samples). For the same reason a
      file a killed build left cut short (numpy writes in place; `kill -9`, an out-of-memory kill)
      is removed before the build, which then writes it again."""
    if dist.is_initialized() and dist.get_rank() != 0:  # the other ranks read the cache
        yield
        return
    setting = ("data.cache_dir", cfg.data.cache_dir) if cfg.data.cache_dir else ("run.dir", cfg.run.dir)
    with writing_into(Path(setting[1]), setting[0]):
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / "build.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another job that builds the data index cache in {cache}", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # no locks on this filesystem
                pass
            _remove_cut_files(cache)
            before = _stamps(cache)
            try:
                yield
            except OSError:
                for path, stamp in _stamps(cache).items():
                    if before.get(path) != stamp:
                        path.unlink(missing_ok=True)
                raise


def _remove_cut_files(cache: Path) -> None:
    """Remove each index file of `cache` shorter than its header says (numpy refuses to map it)."""
    for path in cache.glob("*.npy"):
        try:
            np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            path.unlink()


def _stamps(directory: Path) -> dict[Path, tuple[int, int]]:
    """Each file in `directory`: (size, modification time)."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in directory.glob("*")}


def _cache_dir(cfg: Config, blends: list) -> Path:
    """Where megatron keeps its sample indices: data.cache_dir (default run.dir/data_cache), in a
    folder named by the data files' sizes and modification times. Megatron keys the cache by the
    prefixes' names alone, so a corpus rewritten under its prefix (preprocessed again) would be read
    through the old corpus's indices: past its end, or silently other samples. Rank 0's view counts
    (with node-local copies of the data, every rank must use the one cache rank 0 builds)."""
    prefixes = sorted({prefix for blend in blends if blend for prefix in blend[0]})
    stamps = [[prefix, *((s.st_size, s.st_mtime_ns) for s in (os.stat(prefix + ext) for ext in (".idx", ".bin")))]
              for prefix in prefixes]
    if dist.is_initialized():
        shared = [stamps]
        dist.broadcast_object_list(shared, src=0)
        stamps = shared[0]
    fingerprint = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]
    return Path(cfg.data.cache_dir or Path(cfg.run.dir) / "data_cache") / fingerprint


def get_batch(dataset: Subset, indices: list[int], vocab: int | None = None) -> dict[str, torch.Tensor]:
    """Stack samples `indices` of `dataset` into [b, s] tensors, plus `domain` [b]: the index of
    each sample's source dataset in the blend (megatron's BlendedDataset adds it; 0 without a blend),
    and with data.document_mask `cu_seqlens` [b, s + 1]: each sample's document starts, padded with s.
    With `vocab` (the model's embedding rows), a token id past it is refused: the start-up check
    (indexed.check_token_ids) reads the head of each file only."""
    samples = [dataset[i] for i in indices]
    keys = {**BATCH_DTYPES, "cu_seqlens": torch.int64} if "cu_seqlens" in samples[0] else BATCH_DTYPES
    batch = {key: torch.stack([s[key] for s in samples]).to(dtype) for key, dtype in keys.items()}
    batch["domain"] = torch.tensor([int(s.get("dataset_id", 0)) for s in samples], dtype=torch.int64)
    if vocab is not None:
        _check_token_ids(dataset, indices, batch, vocab)
    return batch


def _check_token_ids(dataset: Subset, indices: list[int], batch: dict[str, torch.Tensor], vocab: int) -> None:
    """An id past the embedding would end training as an index error (on a GPU, a device-side
    assert that names nothing); this names the file it came from. Only this rank reads the
    sample, so the error is this rank's to print."""
    largest = torch.maximum(batch["tokens"].amax(1), batch["labels"].amax(1))
    past = (largest >= vocab).nonzero().flatten().tolist()
    if not past:
        return
    row = past[0]
    source = dataset.dataset  # megatron's BlendedDataset of GPTDatasets, or one GPTDataset
    if hasattr(source, "datasets"):
        source = source.datasets[int(batch["domain"][row])]
    where = seen_on(dist.get_rank(), dist.get_world_size(), socket.gethostname()) if dist.is_initialized() else ""
    raise RankError(f"{source.dataset.path_prefix}.bin holds token id {int(largest[row])} (in sample {indices[row]}), "
                    f"past the model's {vocab} embedding rows: that file, or part of it, was tokenized with another "
                    "tokenizer (the start-up check reads the first 2**20 tokens of each file): preprocess it with "
                    f"data.tokenizer's tokenizer, or leave it out of the blend{where}")
