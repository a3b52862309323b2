"""Data pipeline: sample corpus, .bin/.idx writer, tokenizer loading, blends and GPT datasets."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_sdmoe.config import Config
from megatron_sdmoe.data import (build_datasets, ensure_sample_corpus, get_batch, load_tokenizer, parse_blend,
                                 sample_documents, write_indexed)
from megatron_sdmoe.data import sample_corpus
from megatron_sdmoe.errors import UserError

# megatron's IndexedDataset logs through a helper that warns when torch.distributed is not initialized.
single_process = pytest.mark.filterwarnings("ignore:Could not determine rank")


@pytest.fixture(scope="module")
def corpus():
    return ensure_sample_corpus()  # the shared default cache: built once, reused by later runs


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus.tokenizer_dir)


@single_process
def test_sample_corpus_matches_documents(corpus, tok):
    docs = sample_documents()
    ds = IndexedDataset(corpus.prefix)  # megatron-core's own reader
    assert len(ds.document_indices) - 1 == len(docs) == len(ds)
    for i in sorted({0, 1, 2, len(docs) // 3, len(docs) // 2, len(docs) - 2, len(docs) - 1}):
        assert ds[i].tolist() == tok.tokenize(docs[i]) + [tok.eod], f"document {i}"
    assert tok.detokenize(tok.tokenize(docs[-1])) == docs[-1]


def test_sample_tokenizer(tok):
    assert tok.vocab_size == sample_corpus.VOCAB_SIZE
    assert tok.hf.eos_token == sample_corpus.EOT and tok.eod == tok.hf.eos_token_id
    assert tok.pad == -1  # pad == eos in the HF tokenizer; reported absent so eos stays in the loss
    assert tok.tokenize("") == []


def test_sample_corpus_is_reused(corpus):
    before = Path(corpus.prefix + ".bin").stat().st_mtime_ns
    assert ensure_sample_corpus() == corpus
    assert Path(corpus.prefix + ".bin").stat().st_mtime_ns == before


def test_sdmoe_cache_holds_the_corpus(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SDMOE_CACHE", str(tmp_path))
    built = Path(corpus.prefix).parent
    shutil.copytree(built, tmp_path / built.name)  # as if built there (a build takes a minute)
    moved = ensure_sample_corpus()
    assert Path(moved.prefix).parent == tmp_path / built.name and Path(moved.tokenizer_dir).parent == tmp_path / built.name


def test_sample_corpus_lost_race_keeps_winner(tmp_path, monkeypatch):
    final = sample_corpus.corpus_dir(tmp_path)

    def build_while_another_process_wins(out: Path) -> None:
        (out / "mine").write_text("")
        final.mkdir()
        (final / "theirs").write_text("")

    monkeypatch.setattr(sample_corpus, "_build", build_while_another_process_wins)
    corpus = ensure_sample_corpus(tmp_path)
    assert corpus.prefix == str(final / "corpus")
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_sample_corpus_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def failing_build(out: Path) -> None:
        (out / "half-written").write_text("")
        raise RuntimeError("killed")

    monkeypatch.setattr(sample_corpus, "_build", failing_build)
    with pytest.raises(RuntimeError):
        ensure_sample_corpus(tmp_path)
    assert not sample_corpus.corpus_dir(tmp_path).exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@single_process
@pytest.mark.parametrize("vocab_size", [1000, 100_000])  # uint16 and int32 on disk
def test_write_indexed_round_trip(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, int(n)).tolist() for n in rng.integers(1, 50, 30)]
    prefix = str(tmp_path / "custom")
    write_indexed(prefix, docs, vocab_size)
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(docs)
    assert [ds[i].tolist() for i in range(len(docs))] == docs


def test_write_indexed_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_indexed(str(tmp_path / "bad"), [[1, 2, 70_000]], 1000)


def _corpus(path: Path, low: int, high: int, eod: int, seed: int, docs: int = 200) -> str:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, high, int(n)).tolist() + [eod] for n in rng.integers(5, 80, docs)]
    write_indexed(str(path), docs, high)
    return str(path)


def _cfg(tmp_path: Path, path: list, seq_length: int = 32) -> Config:
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.path = path
    cfg.data.seq_length = seq_length
    return cfg


def _cached(tmp_path: Path, tok) -> Config:
    """A config on a small corpus with its index cache in tmp_path/cache (as jobs share one)."""
    cfg = _cfg(tmp_path, [_corpus(tmp_path / "data", 1, 2000, tok.eod, seed=1)])
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def _fresh_cache_gives(train, cfg: Config, tok) -> bool:
    """Whether `train` holds the samples a build into an empty cache gives (cfg then names that cache)."""
    cfg.data.cache_dir = str(Path(cfg.run.dir).parent / "fresh_cache")
    fresh = build_datasets(cfg, tok, len(train), 8).train
    return torch.equal(get_batch(train, list(range(len(train))))["tokens"],
                       get_batch(fresh, list(range(len(train))))["tokens"])


def test_build_datasets_blend(tmp_path, tok):
    # Corpus a uses ids [1, 2000), corpus b [2000, 4000): each sample shows which one it came from.
    a = _corpus(tmp_path / "a", 1, 2000, tok.eod, seed=1)
    b = _corpus(tmp_path / "b", 2000, 4000, tok.eod, seed=2)
    train, valid, _ = build_datasets(_cfg(tmp_path, [0.25, a, 0.75, b]), tok, 200, 16)
    assert (len(train), len(valid)) == (200, 16)
    for ds in (train, valid):
        batch = get_batch(ds, list(range(len(ds))))
        assert batch["tokens"].shape == batch["labels"].shape == (len(ds), 32)
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    tokens = get_batch(train, list(range(200)))["tokens"]
    from_a = (tokens < 2000).all(dim=1)
    from_b = ((tokens >= 2000) | (tokens == tok.eod)).all(dim=1)
    assert (from_a ^ from_b).all()  # samples never mix the corpora
    assert 30 <= from_a.sum().item() <= 70  # weight 0.25 of 200


def test_build_datasets_sample_corpus_and_batch(tmp_path, tok):
    cfg = _cfg(tmp_path, [], seq_length=64)
    train, valid, _ = build_datasets(cfg, tok, 48, 8)
    assert (len(train), len(valid)) == (48, 8)
    batch = get_batch(train, list(range(16, 32)))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((16, 64), torch.int64), "labels": ((16, 64), torch.int64),
        "loss_mask": ((16, 64), torch.float32), "position_ids": ((16, 64), torch.int64),
        "domain": ((16,), torch.int64)}
    assert not batch["domain"].any()  # one dataset, no blend: domain 0
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][0], torch.arange(64))
    # Same seed, fresh index cache: the same samples (what resuming relies on).
    cfg.data.cache_dir = str(tmp_path / "other_cache")
    again = build_datasets(cfg, tok, 48, 8).train
    assert torch.equal(get_batch(again, list(range(16, 32)))["tokens"], batch["tokens"])


@single_process
def test_document_mask_is_megatron_cores_eod_mask(tmp_path, tok):
    """data.document_mask: the same samples, with the document starts megatron-core's GPTDataset
    gives (inter_document_masking); the attention mask built from them is the one megatron-core
    builds from the EOD tokens that end the sample corpus's documents (reset_attention_mask)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_sdmoe.models.attention import document_attention_mask

    cfg = _cfg(tmp_path, [], seq_length=64)
    plain = get_batch(build_datasets(cfg, tok, 16, 0).train, list(range(16)))
    cfg.data.document_mask, cfg.data.cache_dir = True, str(tmp_path / "masked_cache")
    batch = get_batch(build_datasets(cfg, tok, 16, 0).train, list(range(16)))
    assert torch.equal(batch["tokens"], plain["tokens"]) and batch["cu_seqlens"].shape == (16, 65)
    masks = document_attention_mask(batch["cu_seqlens"], 64)
    assert masks.shape == (16, 1, 64, 64)
    for tokens, mask in zip(batch["tokens"], masks):
        want = _get_ltor_masks_and_position_ids(tokens, tok.eod, False, True, False, True)[0]
        assert torch.equal(mask, want)
    causal_only = torch.triu(torch.ones(64, 64), 1).sum()
    assert (masks.flatten(1).sum(1) > causal_only).sum() >= 8  # most samples hold 2+ documents


@single_process
def test_document_mask_refuses_a_corpus_split_into_sentences(tmp_path, corpus, tok):
    """megatron-core's GPTDataset takes each sequence for a document: on a corpus tokenized with
    --split-sentences a token would attend only within its sentence."""
    from megatron_sdmoe.data import preprocess

    text = " ".join(f"Sentence {i} of the document." for i in range(40))
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"text": "{text}"}}\n' for _ in range(20)))
    preprocess.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "docs"),
                     "--tokenizer", corpus.tokenizer_dir, "--split-sentences"])
    cfg = _cfg(tmp_path, [str(tmp_path / "docs_text_sentence")])
    cfg.data.document_mask = True
    with pytest.raises(UserError, match="docs_text_sentence, whose documents are split into sentences"):
        build_datasets(cfg, tok, 8, 8)


@single_process
def test_eod_mask_loss_drops_the_prediction_across_each_document_boundary(tmp_path, tok):
    """data.eod_mask_loss: the same samples; no loss where the input token is an EOD (its label is
    the next document's first token), a loss everywhere else."""
    cfg = _cfg(tmp_path, [], seq_length=64)
    plain = get_batch(build_datasets(cfg, tok, 16, 0).train, list(range(16)))
    cfg.data.eod_mask_loss, cfg.data.cache_dir = True, str(tmp_path / "masked_cache")
    batch = get_batch(build_datasets(cfg, tok, 16, 0).train, list(range(16)))
    assert torch.equal(batch["tokens"], plain["tokens"]) and plain["loss_mask"].all()
    assert torch.equal(batch["loss_mask"], (batch["tokens"] != tok.eod).float())
    assert (batch["tokens"] == tok.eod).sum() >= 8  # the samples cross document boundaries


def test_build_datasets_without_validation(tmp_path, tok):
    train, valid, test = build_datasets(_cfg(tmp_path, []), tok, 8, 0)
    assert len(train) == 8 and valid is None and test is None


@single_process
def test_build_datasets_test_split_holds_the_last_documents(tmp_path, tok):
    # Document i is token 10 + i repeated: each sample's tokens name the documents it came from.
    prefix = str(tmp_path / "numbered")
    write_indexed(prefix, [[10 + i] * 40 + [tok.eod] for i in range(100)], tok.vocab_size)
    cfg = _cfg(tmp_path, [prefix])
    cfg.data.split = "80,10,10"
    splits = build_datasets(cfg, tok, 64, 16)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (64, 16, 16)
    for dataset, documents in ((splits.train, range(0, 80)), (splits.valid, range(80, 90)),
                               (splits.test, range(90, 100))):
        seen = set(get_batch(dataset, list(range(len(dataset))))["tokens"].unique().tolist()) - {tok.eod}
        assert seen and seen <= {10 + i for i in documents}
    cfg.data.split = "90,10,0"  # no weight: no test set
    assert build_datasets(cfg, tok, 64, 16).test is None


def test_build_datasets_empty_splits(tmp_path, tok):
    cfg = _cfg(tmp_path, [])
    cfg.data.split = "100,0,0"
    with pytest.raises(UserError, match="validation set no documents"):
        build_datasets(cfg, tok, 8, 8)
    tiny = str(tmp_path / "tiny")
    write_indexed(tiny, [[5, 6, 7, tok.eod]] * 10, tok.vocab_size)  # 2% of 10 documents: none
    with pytest.raises(UserError, match="validation split of .*tiny"):
        build_datasets(_cfg(tmp_path, [tiny]), tok, 8, 8)


def test_build_datasets_sample_corpus_needs_its_tokenizer(tmp_path, tok):
    other = tmp_path / "other_tokenizer"
    tok.hf.save_pretrained(str(other))
    with pytest.raises(UserError, match="sample corpus"):
        build_datasets(_cfg(tmp_path, []), load_tokenizer(other), 8, 8)


@pytest.mark.parametrize("split", ["98;2", "0,1,0", "1,2,3,4", "a,b"])
def test_bad_split(tmp_path, tok, split):
    cfg = _cfg(tmp_path, [])
    cfg.data.split = split
    with pytest.raises(UserError, match="data.split"):
        build_datasets(cfg, tok, 8, 8)


def test_parse_blend(tmp_path):
    a = _corpus(tmp_path / "a", 0, 100, 0, seed=1)
    b = _corpus(tmp_path / "b", 0, 100, 0, seed=2)
    assert parse_blend([a]) == ([a], None)
    assert parse_blend([1, a, "3", b]) == ([a, b], [1.0, 3.0])


@pytest.mark.parametrize("entries, message", [
    (["{a}", "{a}", "{a}"], "3 entries"),
    (["heavy", "{a}"], "weight 'heavy'"),
    ([-0.5, "{a}"], "weight -0.5"),
    ([0, "{a}"], "weight 0"),
    ([1, "{a}", 1, "{missing}"], "missing.bin"),
    (["{a}.bin"], "without the extension"),
    ([1, "{a}", 2, "{a}"], "appears twice in data.stages.0..path: give it once, with its weights summed"),  # drew samples twice
    ([1, "{a}", 2, "{linked}"], "linked appears twice"),  # the same files under another prefix
])
def test_parse_blend_errors(tmp_path, entries, message):
    a = _corpus(tmp_path / "a", 0, 100, 0, seed=1)
    for ext in (".bin", ".idx"):
        os.link(a + ext, tmp_path / f"linked{ext}")
    names = {"a": a, "missing": tmp_path / "missing", "linked": tmp_path / "linked"}
    entries = [e.format(**names) if isinstance(e, str) else e for e in entries]
    with pytest.raises(UserError, match=message) as info:
        parse_blend(entries, "data.stages[0].path")
    assert "\n" not in str(info.value) and "data.stages[0].path" in str(info.value)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="could not be loaded"):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer


@single_process
def test_a_corpus_rewritten_under_its_prefix_is_indexed_afresh(tmp_path, tok):
    """megatron's index cache is keyed by the prefix, not the files: a corpus rewritten in place
    (preprocessed again, other documents) must not be read through the old corpus's indices."""
    cfg = _cached(tmp_path, tok)
    build_datasets(cfg, tok, 64, 8)
    _corpus(tmp_path / "data", 2000, 4000, tok.eod, seed=2, docs=150)  # other documents, other lengths
    assert _fresh_cache_gives(build_datasets(cfg, tok, 64, 8).train, cfg, tok)


@single_process
def test_an_index_cache_write_that_fails_is_one_line_and_leaves_no_partial_cache(tmp_path, tok, monkeypatch):
    """The disk fills while megatron writes the train split's shuffle index (the last file of a
    split, so megatron would take the cut file for a cached one): one line naming the directory and
    the fix, the build's files removed, and the next build gives the samples of a fresh cache."""
    import errno

    cfg = _cached(tmp_path, tok)
    save = np.save

    def disk_fills(path, array, **kwargs):
        if "train-shuffle_index" in str(path):
            Path(path).write_bytes(b"\x93NUMPY" + bytes(10))  # as far as it got
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(path, array, **kwargs)

    monkeypatch.setattr(np, "save", disk_fills)
    with pytest.raises(UserError) as failed:
        build_datasets(cfg, tok, 64, 8)
    assert str(failed.value) == (f"writing into data.cache_dir {tmp_path / 'cache'} failed (No space left on "
                                 "device): free space or quota there, then start again")
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["build.lock"]
    monkeypatch.setattr(np, "save", save)
    assert _fresh_cache_gives(build_datasets(cfg, tok, 64, 8).train, cfg, tok)


@single_process
def test_an_index_file_a_killed_build_cut_short_is_built_again(tmp_path, tok):
    """kill -9 while megatron writes the shuffle index (in place) leaves the start of it; the next
    build writes it again (megatron, finding every file, would map the cut one: an error at every start)."""
    cfg = _cached(tmp_path, tok)
    build_datasets(cfg, tok, 64, 8)
    shuffle = next((tmp_path / "cache").rglob("*train-shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[:200])
    assert _fresh_cache_gives(build_datasets(cfg, tok, 64, 8).train, cfg, tok)


@single_process
def test_jobs_that_share_an_index_cache_build_it_one_at_a_time(tmp_path, tok, capsys):
    """While another job builds indices in the shared data.cache_dir (it holds the folder's lock), a
    build waits, saying so, and writes nothing; once that job is done, it goes on."""
    import fcntl
    import threading

    cfg = _cached(tmp_path, tok)
    build_datasets(cfg, tok, 64, 8)
    [folder] = (tmp_path / "cache").iterdir()
    files = sorted(folder.iterdir())
    built = []
    with open(folder / "build.lock", "a") as other_job:
        fcntl.flock(other_job, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: built.append(build_datasets(cfg, tok, 128, 8).train))
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive() and sorted(folder.iterdir()) == files  # more samples: its own files, not yet
    waiting.join(timeout=120)
    assert f"waiting for another job that builds the data index cache in {folder}" in capsys.readouterr().out
    assert len(sorted(folder.iterdir())) > len(files)
    assert _fresh_cache_gives(built[0], cfg, tok)
