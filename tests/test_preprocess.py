"""sdmoe-preprocess and sdmoe-data: round trips through megatron-core's reader, bad input, checks.

Each CLI start imports torch and megatron-core (several seconds on the 2-core machine), so most tests
call the entry points' main() in this process (`cli`); a few run them as subprocesses (`run_process`:
`python -m ...`), as users do, for the real start-up, worker pool and stderr.
"""
import functools
import gzip
import json
import os
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import datasets
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer as BPETokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import python_m
from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer, sample_documents
from megatron_sdmoe.data import inspect as data_cli, preprocess
from megatron_sdmoe.data.indexed import write_indexed

PREPROCESS, DATA = "megatron_sdmoe.data.preprocess", "megatron_sdmoe.data.inspect"
MAINS = {PREPROCESS: preprocess.main, DATA: data_cli.main}
# Handwritten documents: non-ASCII text, and sentences for --split-sentences.
EXTRA_DOCS = ["Unicode: naïve café, 日本語のテキスト. Ünïcödé again!",
              "One sentence. Another one!  A third?\nLast"]

# megatron-core's reader outside torch.distributed; the worker pool forking this process, which has
# torch's threads (the workers only tokenize, so no lock those threads hold is ever needed).
pytestmark = [pytest.mark.filterwarnings("ignore:Could not determine rank"),
              pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork()")]


class Result(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def tokenizer_dir():
    return ensure_sample_corpus().tokenizer_dir


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def docs():
    return sample_documents()[:150] + EXTRA_DOCS


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run an entry point's main() here; returns its exit code and output."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # main() sets it too; restored after the test
    # datasets' parquet reader leaves a lock file in its cache: not in the user's.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))

    def run(module: str, *args) -> Result:
        capsys.readouterr()  # drop what the test printed before (datasets' progress bars)
        try:
            MAINS[module]([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        return Result(code, *capsys.readouterr())
    return run


def run_process(module: str, *args) -> Result:
    proc = python_m(module, *args)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    lines = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(lines.encode()) if gz else lines.encode())
    return path


def documents(prefix: Path) -> list[list[list[int]]]:
    """Each document's items (token lists), read with megatron-core's IndexedDataset."""
    ds = IndexedDataset(str(prefix))
    bounds = ds.document_indices
    return [[ds[j].tolist() for j in range(bounds[i], bounds[i + 1])] for i in range(len(bounds) - 1)]


def expected(tok, texts: list[str]) -> list[list[list[int]]]:
    return [[tok.tokenize(text) + [tok.eod]] for text in texts]


def same_pair(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx"))


def test_round_trip_jsonl_one_and_two_workers(tmp_path, cli, tok, tokenizer_dir, docs):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "text": d} for i, d in enumerate(docs * 3)])
    for workers, run in ((1, functools.partial(cli, PREPROCESS)), (2, functools.partial(run_process, PREPROCESS))):
        result = run("--input", corpus, "--output-prefix", tmp_path / f"w{workers}", "--tokenizer", tokenizer_dir,
                     "--workers", workers)
        assert result.code == 0, result.err
        assert result.out.startswith(f"done: {len(docs) * 3:,} documents, ") and "tokens/s" in result.out
        assert result.err == ""  # the progress bar only shows on a terminal
    assert documents(tmp_path / "w1_text_document") == expected(tok, docs * 3)
    assert same_pair(tmp_path / "w1_text_document", tmp_path / "w2_text_document")


def test_round_trip_parquet_gz_arrow_and_saved_dataset(tmp_path, cli, tok, tokenizer_dir, docs):
    files = tmp_path / "files"
    files.mkdir()
    datasets.Dataset.from_dict({"text": docs[:50], "n": list(range(50))}).to_parquet(str(files / "a.parquet"))
    write_jsonl(files / "b.jsonl.gz", [{"text": d} for d in docs[50:100]], gz=True)
    datasets.Dataset.from_dict({"text": docs[100:]}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(
        str(files / "c.parquet"))  # an empty part file, as sharded writers leave them: no documents
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    twice = cli(PREPROCESS, "--input", tmp_path / "saved", arrow, "--output-prefix", tmp_path / "twice",
                "--tokenizer", tokenizer_dir)  # the saved dataset's own shard: its documents twice
    assert (twice.code, twice.err) == (2, f"error: {arrow} is given twice in --input: give each once\n")
    arrow = Path(shutil.copy(arrow, tmp_path / "copy.arrow"))
    for workers in (1, 2):
        result = cli(PREPROCESS, "--input", files, tmp_path / "saved", arrow, "--output-prefix",
                     tmp_path / f"w{workers}", "--tokenizer", tokenizer_dir, "--workers", workers)
        assert result.code == 0, result.err
    assert documents(tmp_path / "w1_text_document") == expected(tok, docs + docs[100:])
    assert same_pair(tmp_path / "w1_text_document", tmp_path / "w2_text_document")


def test_split_sentences_and_json_keys(tmp_path, cli, tok, tokenizer_dir):
    rows = [{"text": EXTRA_DOCS[1], "title": "Title one. Still the title"}, {"text": "No split here", "title": "Two"}]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    result = cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir,
                 "--split-sentences", "--json-keys", "text", "title")
    assert result.code == 0, result.err
    sentences = [["One sentence.", "Another one!", "A third?", "Last"], ["No split here"]]
    titles = [["Title one.", "Still the title"], ["Two"]]
    for key, docs in (("text", sentences), ("title", titles)):
        want = [[tok.tokenize(s) for s in doc[:-1]] + [tok.tokenize(doc[-1]) + [tok.eod]] for doc in docs]
        assert documents(tmp_path / f"out_{key}_sentence") == want


def test_no_append_eod(tmp_path, cli, tok, tokenizer_dir, docs):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs[:5]])
    result = cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir,
                 "--no-append-eod")
    assert result.code == 0, result.err
    assert documents(tmp_path / "out_text_document") == [[tok.tokenize(d)] for d in docs[:5]]


def test_partitions_then_merge_equal_the_unpartitioned_output(tmp_path, cli, tokenizer_dir, docs):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs * 2])
    common = ["--input", corpus, "--tokenizer", tokenizer_dir]
    assert cli(PREPROCESS, *common, "--output-prefix", tmp_path / "whole").code == 0
    result = cli(PREPROCESS, *common, "--output-prefix", tmp_path / "part", "--partitions", 3, "--workers", 2)
    assert result.code == 0, result.err
    parts = [tmp_path / f"part_{i}_text_document" for i in range(3)]
    sizes = [len(documents(p)) for p in parts]
    assert sum(sizes) == len(docs) * 2 and max(sizes) - min(sizes) <= 1
    result = cli(PREPROCESS, "merge", "--inputs", *parts, "--output-prefix", tmp_path / "merged")
    assert result.code == 0 and result.out.startswith(f"done: merged 3 prefixes, {len(docs) * 2:,} documents"), result
    assert same_pair(tmp_path / "merged", tmp_path / "whole_text_document")


def test_skips_and_counts_empty_documents_and_malformed_lines(tmp_path, cli, tok, tokenizer_dir):
    lines = [{"text": "first"}, '{"text": "broken', {"text": ""}, {"text": "second"}, {"text": " \n "}, "[1, 2]",
             "", {"text": "third"}, '{"text": "a lone \\ud800 surrogate"}', {"text": None}]
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    result = cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir,
                 "--skip-bad")
    assert result.code == 0, result.err
    assert "3 documents" in result.out and "skipped 3 empty documents, 3 malformed lines" in result.out
    assert documents(tmp_path / "out_text_document") == expected(tok, ["first", "second", "third"])


def test_overwrite(tmp_path, cli, tok, tokenizer_dir):
    args = ["--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir]
    assert cli(PREPROCESS, "--input", write_jsonl(tmp_path / "a.jsonl", [{"text": "old"}]), *args).code == 0
    new = write_jsonl(tmp_path / "b.jsonl", [{"text": "new"}])
    assert cli(PREPROCESS, "--input", new, *args).code == 2
    assert cli(PREPROCESS, "--input", new, *args, "--overwrite").code == 0
    assert documents(tmp_path / "out_text_document") == expected(tok, ["new"])


@pytest.fixture(scope="module")
def overflowing_tokenizer(tmp_path_factory):
    """A tokenizer with 3 ids, one of them 70000: its size picks uint16, which 70000 does not fit."""
    bpe = BPETokenizer(models.WordLevel(vocab={"<eos>": 0, "a": 1, "b": 70_000}, unk_token="<eos>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("overflowing_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(str(path))
    return path


def _bad_preprocess_input(case: str, inputs: Path, tokenizer_dir: str, overflowing: Path) -> tuple[list, str]:
    """(preprocess arguments, expected message) for one kind of bad input."""
    good = [{"text": f"document {i}"} for i in range(600)]  # several batches: some are written before the error
    corpus = inputs / "c.jsonl"
    tokenizer = tokenizer_dir
    if case == "malformed":
        write_jsonl(corpus, good[:300] + ['{"text": "broken'] + good[300:])
        message = f"error: {corpus} line 301 is not a JSON object (Unterminated string starting at: column 10): fix"
    elif case == "missing field":
        write_jsonl(corpus, good[:300] + [{"body": "x"}])
        message = f"error: {corpus} line 301 has no field 'text' (fields: body): name the text field(s)"
    elif case == "lone surrogate":  # read by json, but no Unicode text: the tokenizer raised a TypeError
        write_jsonl(corpus, good[:300] + ['{"text": "a \\udc80 b"}'])
        message = f"error: {corpus} line 301 holds a lone surrogate escape in field 'text' (not Unicode text): fix"
    elif case == "not text":
        write_jsonl(corpus, [{"text": 5}])
        message = f"error: {corpus} line 1: field 'text' is int, not text"
    elif case == "only empty documents":
        write_jsonl(corpus, [{"text": ""}, {"text": "  "}])
        message = "error: no document has text in 'text' (2 empty, 0 malformed lines): check --input"
    elif case == "missing tokenizer":
        write_jsonl(corpus, good)
        tokenizer = inputs / "nope"
        message = f"error: tokenizer directory {tokenizer} not found: set --tokenizer to a local"
    elif case == "tokenizer is a file":
        write_jsonl(corpus, good)
        tokenizer = inputs / "tokenizer.json"
        tokenizer.write_text("{}")
        message = f"error: tokenizer directory {tokenizer} is a file: set --tokenizer to a local"
    elif case == "broken tokenizer":
        write_jsonl(corpus, good)
        tokenizer = inputs / "broken"
        tokenizer.mkdir()
        (tokenizer / "tokenizer.json").write_text("{not json")
        message = f"error: tokenizer directory {tokenizer} could not be loaded"
    elif case == "id overflows dtype":
        write_jsonl(corpus, [{"text": "a a"}] * 300 + [{"text": "a b"}])
        tokenizer = overflowing
        message = (f"error: {corpus} line 301: token id 70000 is outside the tokenizer's 3 ids, so it does not fit "
                   "uint16")
    elif case == "missing input":
        corpus = inputs / "absent.jsonl"
        message = f"error: input {corpus} not found"
    elif case == "unsupported input":
        corpus = inputs / "c.txt"
        corpus.write_text("text")
        message = f"error: input {corpus} is not .jsonl, .jsonl.gz, .parquet or .arrow"
    elif case == "missing column":
        corpus = inputs / "c.parquet"
        datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(corpus))
        message = f"error: {corpus} has no column 'text' (columns: body)"
    elif case == "more partitions than records":  # the last 100 would be empty pairs, which nothing can read
        write_jsonl(corpus, good)
        return (["--input", corpus, "--tokenizer", tokenizer, "--partitions", 700],
                "error: --partitions 700 exceeds the input's 600 records: give at most 600")
    elif case == "a file given twice":  # also as one of a directory's: its documents would be written twice
        write_jsonl(corpus, good)
        return (["--input", inputs, corpus, "--tokenizer", tokenizer], f"error: {corpus} is given twice in --input")
    elif case == "a file given twice by another name":  # a hard link holds the same documents
        write_jsonl(corpus, good)
        os.link(corpus, inputs / "linked.jsonl")
        return (["--input", corpus, inputs / "linked.jsonl", "--tokenizer", tokenizer],
                f"error: {inputs / 'linked.jsonl'} is given twice in --input")
    elif case == "a partition of records without text":  # counted as records, they give no documents
        write_jsonl(corpus, [{"text": "one two"}, {"text": ""}, {"text": "three four"}])
        return (["--input", corpus, "--tokenizer", tokenizer, "--partitions", 3],
                "error: --partitions 3 leaves ")
    return ["--input", corpus, "--tokenizer", tokenizer], message


BAD_INPUTS = ["malformed", "lone surrogate", "missing field", "not text", "only empty documents", "missing tokenizer",
              "tokenizer is a file", "broken tokenizer", "id overflows dtype", "missing input", "unsupported input",
              "missing column", "more partitions than records", "a partition of records without text",
              "a file given twice", "a file given twice by another name"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_exit_2_no_files(tmp_path, cli, tokenizer_dir, overflowing_tokenizer, case):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    args, message = _bad_preprocess_input(case, inputs, tokenizer_dir, overflowing_tokenizer)
    result = cli(PREPROCESS, *args, "--output-prefix", out / "c", "--workers", 2)
    assert (result.code, result.out) == (2, "")
    assert result.err.count("\n") == 1 and result.err.startswith(message), result.err
    assert list(out.iterdir()) == []


def test_bad_input_in_a_process(tmp_path, tokenizer_dir, overflowing_tokenizer):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    args, message = _bad_preprocess_input("malformed", inputs, tokenizer_dir, overflowing_tokenizer)
    result = run_process(PREPROCESS, *args, "--output-prefix", out / "c", "--workers", 2)
    assert result.code == 2 and result.err.startswith(message) and result.err.count("\n") == 1, result.err
    assert list(out.iterdir()) == []


def test_an_output_prefix_that_names_a_directory(tmp_path, cli, tokenizer_dir):
    """DIR/ would write DIR/_text_document.bin: refused, naming a prefix to use instead."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    (tmp_path / "out").mkdir()
    for prefix in (f"{tmp_path / 'out'}/", str(tmp_path / "out")):
        result = cli(PREPROCESS, "--input", corpus, "--output-prefix", prefix, "--tokenizer", tokenizer_dir)
        assert result.code == 2 and result.err == (
            f"error: argument --output-prefix: {prefix!r} names a directory: give a file-name prefix in it, e.g. "
            f"{tmp_path / 'out' / 'corpus'}: see sdmoe-preprocess --help\n"), result.err
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_kept(tmp_path, cli, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    (tmp_path / "out_text_document.idx").write_text("precious")
    result = cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_dir)
    assert result.code == 2
    assert result.err == (f"error: {tmp_path}/out_text_document.idx exists: pass --overwrite to replace it, or "
                          "choose another --output-prefix\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out_text_document.idx"]
    assert (tmp_path / "out_text_document.idx").read_text() == "precious"


@pytest.fixture
def good_prefix(tmp_path, cli, tokenizer_dir, docs):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    result = cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "good", "--tokenizer", tokenizer_dir)
    assert result.code == 0, result.err
    return tmp_path / "good_text_document"


def test_inspect(good_prefix, tok, tokenizer_dir, docs):
    result = run_process(DATA, "inspect", good_prefix, "--tokenizer", tokenizer_dir, "--sample-tokens", 8)
    assert result.code == 0, result.err
    tokens = sum(len(tok.tokenize(d)) + 1 for d in docs)
    first = tok.tokenize(docs[0]) + [tok.eod]
    assert result.out.splitlines() == [
        f"prefix     {good_prefix}",
        f"documents  {len(docs):,}",
        f"sequences  {len(docs):,}",
        f"tokens     {tokens:,} (per document: mean {tokens / len(docs):,.1f}, longest "
        f"{max(len(tok.tokenize(d)) + 1 for d in docs):,})",
        "dtype      uint16 (2 bytes per token)",
        f"sample     document 0, first 8 of {len(first):,} tokens: {tok.detokenize(first[:8])!r}"]


def test_check_good_prefix(good_prefix, cli, tok, docs):
    result = cli(DATA, "check", good_prefix)
    tokens = sum(len(tok.tokenize(d)) + 1 for d in docs)
    assert result == Result(0, f"ok: {good_prefix}: .idx matches .bin ({len(docs):,} documents, {len(docs):,} "
                               f"sequences, {tokens:,} tokens, uint16)\n", "")


def _corrupt(prefix: Path, how: str) -> str:
    """Damage the pair; returns the expected start of the error line (after 'error: ')."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    mismatch = f"{idx} does not match {bin_}: "
    if how == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
        return mismatch + "its sequence lengths add up to"
    if how == "longer bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0")
        return mismatch + "its sequence lengths add up to"
    if how == "bad pointer":
        data = bytearray(idx.read_bytes())
        sequences = struct.unpack_from("<Q", data, 18)[0]
        pointer = 34 + 4 * sequences + 8  # the second sequence's byte offset
        struct.pack_into("<q", data, pointer, struct.unpack_from("<q", data, pointer)[0] + 2)
        idx.write_bytes(bytes(data))
        return mismatch + "sequence 1 starts at byte"
    if how == "truncated idx":
        idx.write_bytes(idx.read_bytes()[:-8])
        return f"{idx} is not a readable Megatron index"
    if how == "not an index":
        idx.write_bytes(b"not an index at all, but long enough")
        return f"{idx} is not a readable Megatron index (bad header"
    if how == "no documents":  # an empty .bin, which megatron's reader cannot map
        write_indexed(str(prefix), [], 4096)
        return f"{prefix} holds no documents: leave it out, or re-create it from input with text"
    raise AssertionError(how)


CORRUPTIONS = ["truncated bin", "longer bin", "bad pointer", "truncated idx", "not an index", "no documents"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_check_and_merge_refuse_a_mismatched_pair(good_prefix, cli, how):
    message = _corrupt(good_prefix, how)
    result = cli(DATA, "check", good_prefix)
    assert result.code == 2 and result.err.startswith("error: " + message) and result.err.count("\n") == 1, result
    merged = good_prefix.parent / "merged"
    result = cli(PREPROCESS, "merge", "--inputs", good_prefix, "--output-prefix", merged)
    assert result.code == 2 and result.err.startswith("error: " + message), result.err
    assert not list(good_prefix.parent.glob("merged*"))


@pytest.mark.parametrize("by_another_name", [False, True])
def test_merge_refuses_a_prefix_given_twice(good_prefix, cli, by_another_name):
    merged, again = good_prefix.parent / "merged", good_prefix
    if by_another_name:  # symlinked files under another prefix
        again = good_prefix.parent / "again"
        for ext in (".bin", ".idx"):
            os.symlink(f"{good_prefix}{ext}", f"{again}{ext}")
    result = cli(PREPROCESS, "merge", "--inputs", good_prefix, again, "--output-prefix", merged)
    assert (result.code, result.err) == (2, f"error: {again} is given twice in --inputs: give each once\n")
    assert not list(good_prefix.parent.glob("merged*"))
