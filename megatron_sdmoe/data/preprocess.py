"""sdmoe-preprocess: tokenize a text corpus into Megatron .bin/.idx files, or merge such files.

Flags follow Megatron-LM's tools/preprocess_data.py. Inputs are .jsonl / .jsonl.gz files (one JSON
object per line), .parquet or .arrow files, directories of those, or `datasets` save_to_disk
directories. Every input record becomes one document of `<output-prefix>_<key>_document` per
--json-keys key (`_sentence` with --split-sentences, where each sentence is one item of it).

    sdmoe-preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer TOKENIZER_DIR --workers 4
    sdmoe-preprocess merge --inputs data/c_0_text_document data/c_1_text_document --output-prefix data/c_text_document
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_sdmoe.data.indexed import open_checked, repeated_file
from megatron_sdmoe.data.tokenizer import Tokenizer, load_tokenizer
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input, positive_int

BATCH_RECORDS = 256  # records per worker task: amortises the transfer between processes, keeps progress smooth
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk leaves in a directory
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TMP = ".tmp"  # suffix of outputs being written; renamed away once everything succeeded


# --- inputs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """Consecutive records of one input: raw JSON lines (parsed in the workers), or table columns."""
    source: str
    first: int  # number of the first record in `source`: 1-based line, or 0-based row
    lines: list[bytes] | None = None
    columns: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.lines) if self.lines is not None else len(next(iter(self.columns.values())))

    def where(self, offset: int) -> str:
        return f"{self.source} {'line' if self.lines is not None else 'row'} {self.first + offset}"


@dataclass(frozen=True)
class JsonlFile:
    path: str

    def files(self) -> list[str]:
        return [self.path]

    def count(self) -> int:
        return sum(map(len, self.batches(())))

    def batches(self, keys: Iterable[str]) -> Iterator[Batch]:
        opener = gzip.open if self.path.endswith(".gz") else open
        try:
            with opener(self.path, "rb") as f:
                first = 1
                while lines := list(itertools.islice(f, BATCH_RECORDS)):
                    yield Batch(self.path, first, lines=lines)
                    first += len(lines)
        except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged / truncated .gz
            raise UserError(f"{self.path} could not be read ({e}): check the file (for .gz: gzip -t)") from e


@dataclass(frozen=True)
class TableFile:
    """A .parquet or .arrow file, or a `datasets` save_to_disk directory, read with `datasets`."""
    path: str

    def load(self):
        import datasets  # about a second to import: only for table inputs
        try:
            if os.path.isdir(self.path):
                table = datasets.load_from_disk(self.path)
            elif self.path.endswith(".arrow"):
                table = datasets.Dataset.from_file(self.path)  # memory-mapped, no cache copy
            else:
                table = datasets.IterableDataset.from_parquet(self.path)  # streamed, no cache copy
        except (OSError, ValueError) as e:
            raise UserError(f"{self.path} could not be read as a dataset ({e}): check the file") from e
        if isinstance(table, datasets.DatasetDict):
            raise UserError(f"{self.path} holds the splits {', '.join(table)}: give one split's directory, e.g. "
                            f"{os.path.join(self.path, next(iter(table)))}")
        return table

    def files(self) -> list[str]:
        """The files its records come from: a save_to_disk directory's data files, else itself."""
        try:
            with open(os.path.join(self.path, "state.json")) as f:
                return [os.path.join(self.path, item["filename"]) for item in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):  # not a saved dataset (its load says what is wrong)
            return [self.path]

    def count(self) -> int:
        if self.path.endswith(".parquet"):
            import pyarrow.parquet  # the streamed parquet table has no length; the file's footer has it
            return pyarrow.parquet.read_metadata(self.path).num_rows
        return len(self.load())

    def batches(self, keys: Iterable[str]) -> Iterator[Batch]:
        if self.count() == 0:  # e.g. an empty part file of a sharded corpus (datasets cannot stream it)
            return
        table = self.load()
        missing = [key for key in keys if key not in table.column_names]
        if missing:
            raise UserError(f"{self.path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}): "
                            "name the text column(s) with --json-keys")
        try:
            rows = table.select_columns(list(keys)).iter(batch_size=BATCH_RECORDS)
            for first, columns in zip(itertools.count(0, BATCH_RECORDS), rows):
                yield Batch(self.path, first, columns=columns)
        except (OSError, ValueError) as e:
            raise UserError(f"{self.path} could not be read ({e}): check the file") from e


def find_sources(paths: list[str]) -> list[JsonlFile | TableFile]:
    """The input files in order; a directory stands for its files (sorted) unless save_to_disk made it."""
    sources = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"input {path} not found: give existing files or directories with --input")
        if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in SAVED_DATASET_FILES):
            files = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.endswith(JSONL_SUFFIXES + TABLE_SUFFIXES))
            if not files:
                raise UserError(f"input directory {path} has no .jsonl, .jsonl.gz, .parquet or .arrow files and is "
                                "not a datasets save_to_disk directory: give the corpus files with --input")
            sources += [source(f) for f in files]
        else:
            sources.append(source(path))
    given_once([file for s in sources for file in s.files()], "--input")
    return sources


def given_once(paths: list[str], flag: str, suffix: str = "") -> None:
    """Refuse a file given twice (also as one of a directory's, or by another name): its documents
    would be written twice."""
    twice = repeated_file(paths, suffix)
    if twice is not None:
        raise UserError(f"{twice} is given twice in {flag}: give each once")


def source(path: str) -> JsonlFile | TableFile:
    if os.path.isdir(path) or path.endswith(TABLE_SUFFIXES):
        return TableFile(path)
    if path.endswith(JSONL_SUFFIXES):
        return JsonlFile(path)
    raise UserError(f"input {path} is not .jsonl, .jsonl.gz, .parquet or .arrow: convert it to one of these")


def read_batches(sources: list[JsonlFile | TableFile], keys: tuple[str, ...]) -> Iterator[Batch]:
    for src in sources:
        yield from src.batches(keys)


# --- tokenizing (in the workers) ----------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """What a worker needs to build its Encoder (sent to each worker process once)."""
    tokenizer: str
    keys: tuple[str, ...]
    split_sentences: bool
    append_eod: bool
    skip_bad: bool


class Document(NamedTuple):
    tokens: np.ndarray  # in the output dtype
    lengths: list[int]  # tokens per item (one item, or one per sentence); they add up to len(tokens)


@dataclass(frozen=True)
class Encoded:
    records: int
    docs: dict[str, list[Document | None]]  # per key, one entry per record of the batch (None: nothing to write)
    empty: int  # documents without text
    malformed: int  # lines skipped by --skip-bad


class Encoder:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.tokenizer = load_cli_tokenizer(options.tokenizer)
        self.dtype = DType.optimal_dtype(self.tokenizer.vocab_size)
        self.eod = [self.tokenizer.eod] if options.append_eod else []

    def encode(self, batch: Batch) -> Encoded:
        texts, malformed = self._texts(batch)
        docs = {key: self._documents(texts[key], batch) for key in self.options.keys}
        empty = sum(text is not None and doc is None for key in docs for text, doc in zip(texts[key], docs[key]))
        return Encoded(len(batch), docs, empty, malformed)

    def _texts(self, batch: Batch) -> tuple[dict[str, list[str | None]], int]:
        """Per key, each record's text (None for blank and malformed lines); the number of malformed lines."""
        malformed = 0
        if batch.columns is not None:
            rows = [dict(zip(batch.columns, values)) for values in zip(*batch.columns.values())]
        else:
            rows = []
            for offset, line in enumerate(batch.lines):
                row, problem = parse_json_line(line, self.options.keys)
                if problem and not self.options.skip_bad:
                    raise UserError(f"{batch.where(offset)} {problem}: fix the line, or pass "
                                    "--skip-bad to skip and count malformed lines")
                malformed += problem is not None
                rows.append(row)
        texts = {key: [None if row is None else text_field(row, key, batch, offset)
                       for offset, row in enumerate(rows)] for key in self.options.keys}
        return texts, malformed

    def _documents(self, texts: list[str | None], batch: Batch) -> list[Document | None]:
        pieces = [self._pieces(text) if text else [] for text in texts]
        flat = [piece for doc in pieces for piece in doc]
        ids = iter(self.tokenizer.tokenize_batch(flat) if flat else [])  # one call: the Rust side loops
        return [self._document([next(ids) for _ in doc], batch, offset) for offset, doc in enumerate(pieces)]

    def _pieces(self, text: str) -> list[str]:
        """The items of a document: its text, or its sentences (without the space between them)."""
        if not text.strip():
            return []
        return [s for s in SENTENCE_END.split(text.strip()) if s] if self.options.split_sentences else [text]

    def _document(self, items: list[list[int]], batch: Batch, offset: int) -> Document | None:
        items = [ids for ids in items if ids]  # items without tokens are dropped, as Megatron does
        if not items:
            return None
        lengths = [len(ids) for ids in items]
        lengths[-1] += len(self.eod)
        tokens = np.fromiter(itertools.chain(*items, self.eod), dtype=np.int64, count=sum(lengths))
        vocab = self.tokenizer.vocab_size
        if tokens.min() < 0 or tokens.max() >= vocab:
            bad = tokens[(tokens < 0) | (tokens >= vocab)][0]
            # The dtype was chosen for ids below the vocabulary size: a larger id would wrap silently.
            raise UserError(f"{batch.where(offset)}: token id {bad} is outside the tokenizer's {vocab} ids, so it "
                            f"does not fit {self.dtype.__name__}: repair the tokenizer so that its ids run from 0 to "
                            "len(tokenizer) - 1")
        return Document(tokens.astype(self.dtype), lengths)


def parse_json_line(line: bytes, keys: Iterable[str]) -> tuple[dict | None, str | None]:
    """(object, None); (None, None) for a blank line; (None, what is wrong) for a malformed one, also
    one whose text field (of `keys`) holds a lone surrogate escape (`\\ud800`): JSON reads it, but it
    is no Unicode text, and the tokenizer would fail on it."""
    if not line.strip():
        return None, None
    try:
        row = json.loads(line.rstrip(b"\r\n"))  # else an unterminated string is reported as a control character
    except UnicodeDecodeError:
        return None, "is not a JSON object (not UTF-8)"
    except json.JSONDecodeError as e:
        return None, f"is not a JSON object ({e.msg}: column {e.colno})"
    if not isinstance(row, dict):
        return None, f"is not a JSON object (a JSON {type(row).__name__})"
    for key in keys:
        text = row.get(key)
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return None, f"holds a lone surrogate escape in field {key!r} (not Unicode text)"
    return row, None


def text_field(row: dict, key: str, batch: Batch, offset: int) -> str:
    if key not in row:
        raise UserError(f"{batch.where(offset)} has no field {key!r} (fields: {', '.join(row) or 'none'}): name "
                        "the text field(s) with --json-keys")
    text = row[key]
    if text is None:  # a missing value (JSON null, a parquet null): an empty document, skipped and counted
        return ""
    if not isinstance(text, str):
        raise UserError(f"{batch.where(offset)}: field {key!r} is {type(text).__name__}, not text: fix the record, "
                        "or name another field with --json-keys")
    return text


def load_cli_tokenizer(directory: str) -> Tokenizer:
    try:
        return load_tokenizer(directory)
    except UserError as e:  # its fixes name the training config's key; here it is a flag
        raise UserError(str(e).replace("data.tokenizer", "--tokenizer")) from e


_worker_encoder: Encoder | None = None  # one per worker process


def _start_worker(options: Options) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(options)


def _encode_in_worker(batch: Batch) -> Encoded:
    return _worker_encoder.encode(batch)


def encode_all(encoder: Encoder, batches: Iterable[Batch], workers: int) -> Iterator[Encoded]:
    """Encoded batches in input order: in this process for one worker, else in a pool."""
    if workers == 1:
        yield from map(encoder.encode, batches)
        return
    # fork: workers start at once, without re-importing torch and megatron-core as spawn would.
    with multiprocessing.get_context("fork").Pool(workers, _start_worker, (encoder.options,)) as pool:
        yield from pool.imap(_encode_in_worker, batches)


# --- outputs ------------------------------------------------------------------------------------

def output_prefix(value: str) -> str:
    """An argparse type: a file-name prefix, not a directory (which would give DIR/_text_document.bin)."""
    if value.endswith(os.sep) or os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} names a directory: give a file-name prefix in it, e.g. "
                                         f"{os.path.join(value, 'corpus')}")
    return value


def check_outputs(prefixes: list[str], overwrite: bool) -> None:
    for prefix in prefixes:
        parent = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise UserError(f"output directory {parent} does not exist or is not writable: create it, or choose "
                            "another --output-prefix")
        existing = [prefix + ext for ext in (".bin", ".idx") if os.path.exists(prefix + ext)]
        if existing and not overwrite:
            raise UserError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another "
                            "--output-prefix")


@contextlib.contextmanager
def staged(prefixes: list[str], dtype: type[np.number]) -> Iterator[dict[str, IndexedDatasetBuilder]]:
    """A builder per prefix writing to temporary files, moved into place only if the block succeeds."""
    builders = {}
    try:
        for prefix in prefixes:
            builders[prefix] = IndexedDatasetBuilder(prefix + ".bin" + TMP, dtype=dtype)
        yield builders
        for prefix, builder in builders.items():
            builder.finalize(prefix + ".idx" + TMP)
    except BaseException:
        for prefix, builder in builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(prefix + ext + TMP)
        raise
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            os.replace(prefix + ext + TMP, prefix + ext)


# --- the two modes ------------------------------------------------------------------------------

@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    malformed: int = 0

    def add(self, encoded: Encoded) -> int:
        """Count a batch in; returns its number of documents."""
        docs = [doc for key_docs in encoded.docs.values() for doc in key_docs if doc is not None]
        self.documents += len(docs)
        self.tokens += sum(doc.tokens.size for doc in docs)
        self.empty += encoded.empty
        self.malformed += encoded.malformed
        return len(docs)

    def summary(self, seconds: float, prefixes: list[str]) -> str:
        seconds = max(seconds, 1e-9)
        line = (f"done: {self.documents:,} documents, {self.tokens:,} tokens in {seconds:.1f} s "
                f"({self.documents / seconds:,.0f} documents/s, {self.tokens / seconds:,.0f} tokens/s)")
        skipped = [f"{n:,} {what}" for n, what in ((self.empty, "empty documents"),
                                                   (self.malformed, "malformed lines")) if n]
        return line + ("; skipped " + ", ".join(skipped) if skipped else "") + " -> " + ", ".join(prefixes)


def partitioner(sources: list[JsonlFile | TableFile], partitions: int) -> Callable[[int], int]:
    """Record number -> partition: contiguous ranges, so merging them in order gives the unpartitioned output."""
    if partitions == 1:
        return lambda record: 0
    total = sum(src.count() for src in sources)  # a pass over the input, only when partitioning
    if 0 < total < partitions:  # a partition without documents could not be read
        raise UserError(f"--partitions {partitions} exceeds the input's {total} records: give at most {total}")
    return lambda record: record * partitions // total


def preprocess(args: argparse.Namespace) -> str:
    """Tokenize the inputs into the outputs; returns the summary line."""
    keys = tuple(dict.fromkeys(args.json_keys))
    encoder = Encoder(Options(args.tokenizer, keys, args.split_sentences, args.append_eod, args.skip_bad))
    sources = find_sources(args.input)
    level = "sentence" if args.split_sentences else "document"
    parts = [f"_{i}" for i in range(args.partitions)] if args.partitions > 1 else [""]
    outputs = {key: [f"{args.output_prefix}{part}_{key}_{level}" for part in parts] for key in keys}
    prefixes = [prefix for key in keys for prefix in outputs[key]]
    check_outputs(prefixes, args.overwrite)
    partition_of = partitioner(sources, args.partitions)
    stats, record, start, filled = Stats(), 0, time.perf_counter(), set()
    with staged(prefixes, encoder.dtype) as builders, tqdm(unit="doc", disable=None) as progress:
        for encoded in encode_all(encoder, read_batches(sources, keys), args.workers):
            for key, docs in encoded.docs.items():
                for offset, doc in enumerate(docs):
                    if doc is not None:
                        prefix = outputs[key][partition_of(record + offset)]
                        builders[prefix].add_document(doc.tokens, doc.lengths)
                        filled.add(prefix)
            record += encoded.records
            documents = stats.add(encoded)
            progress.set_postfix_str(f"{stats.tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
            progress.update(documents)
        if not stats.documents:
            raise UserError(f"no document has text in {', '.join(map(repr, keys))} ({stats.empty:,} empty, "
                            f"{stats.malformed:,} malformed lines): check --input and --json-keys")
        empty = [prefix for prefix in prefixes if prefix not in filled]  # records without text fell there
        if empty:
            raise UserError(f"--partitions {args.partitions} leaves {empty[0]} without documents (its records hold no "
                            "text: blank, empty or malformed lines): give fewer partitions")
    return stats.summary(time.perf_counter() - start, prefixes)


def merge(args: argparse.Namespace) -> str:
    """Concatenate the input pairs, in order, into one; returns the summary line."""
    given_once(args.inputs, "--inputs", ".bin")
    pairs = [open_checked(prefix) for prefix in args.inputs]
    dtypes = list(dict.fromkeys(pair.index.dtype for pair in pairs))
    if len(dtypes) > 1:
        raise UserError(f"the inputs store tokens as {' and '.join(d.__name__ for d in dtypes)}: merge only prefixes "
                        "tokenized with the same tokenizer")
    documents = sum(len(pair.document_indices) - 1 for pair in pairs)
    tokens = sum(int(pair.sequence_lengths.sum()) for pair in pairs)
    check_outputs([args.output_prefix], args.overwrite)
    with staged([args.output_prefix], dtypes[0]) as builders:
        for prefix in args.inputs:
            builders[args.output_prefix].add_index(prefix)
    return (f"done: merged {len(args.inputs)} prefixes, {documents:,} documents, {tokens:,} tokens -> "
            f"{args.output_prefix}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="sdmoe-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".jsonl, .jsonl.gz, .parquet, .arrow files, directories of them, or datasets "
                             "save_to_disk directories")
    parser.add_argument("--output-prefix", required=True, type=output_prefix,
                        help="outputs are <prefix>_<key>_document.bin/.idx (_sentence with --split-sentences)")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="text field(s) to tokenize, one output each (default: text)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="tokenizing processes, one thread each (default 1: in this process)")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one item per sentence (split after . ! ? and whitespace) instead of one per document")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end each document with the tokenizer's eos id (default: on)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip and count malformed JSON lines instead of failing")
    parser.add_argument("--partitions", type=positive_int, default=1,
                        help="write N outputs <prefix>_0_<key>_document, ... of consecutive records (join them with "
                             "`sdmoe-preprocess merge`)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser.parse_args(argv)


def parse_merge_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="sdmoe-preprocess merge",
                                     description="Concatenate .bin/.idx pairs, in the order given, into one.")
    parser.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX", help=".bin/.idx prefixes to merge")
    parser.add_argument("--output-prefix", required=True, type=output_prefix, help="the merged pair's prefix")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # --workers counts cores: the tokenizers library must not add threads of its own to each process.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # megatron-core warns on every index it opens outside torch.distributed; this tool never uses it.
    warnings.filterwarnings("ignore", message="Could not determine rank")
    try:
        if argv[:1] == ["merge"]:
            print(merge(parse_merge_args(argv[1:])))
        else:
            print(preprocess(parse_args(argv)))
    except UserError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
