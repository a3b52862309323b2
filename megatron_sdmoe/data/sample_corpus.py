"""Built-in sample corpus: the Python standard library's documentation, tokenized offline.

Documents are the docstrings (module, class, function) of the stdlib's .py files, read with `ast`
(nothing is imported), plus the pydoc help topics. A byte-level BPE tokenizer is trained on them and
the documents are written in Megatron's .bin/.idx format. The corpus is built once per Python
version (the text comes from that version's stdlib) and reused afterwards.
"""
from __future__ import annotations

import ast
import fcntl
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as BPETokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from megatron_sdmoe.data.indexed import write_indexed
from megatron_sdmoe.data.tokenizer import Tokenizer, load_tokenizer

VERSION = "v1"  # bump when the recipe changes, so old caches are not reused
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
MIN_DOC_CHARS = 64  # drops one-liners such as "Return self==value."
# Test suites, the IDLE and turtle demos and third-party packages are not stdlib documentation.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "idle_test",
             "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}
TOKENIZE_CHUNK = 512


@dataclass(frozen=True)
class SampleCorpus:
    prefix: str  # Megatron .bin/.idx prefix
    tokenizer_dir: str  # Hugging Face tokenizer directory


def default_cache_root() -> Path:
    return Path(os.environ.get("SDMOE_CACHE") or Path.home() / ".cache" / "megatron_sdmoe")


def corpus_dir(root: Path | None = None) -> Path:
    v = sys.version_info
    return (root or default_cache_root()) / f"sample-corpus-{VERSION}-py{v.major}.{v.minor}.{v.micro}"


def stdlib_sources() -> list[Path]:
    """The standard library's own .py files (no tests, demos or third-party packages), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])
                  and not p.relative_to(stdlib).parts[0].startswith("config-"))


def sample_documents() -> list[str]:
    """The corpus documents, in corpus order (deterministic for a given stdlib)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, None] = {}  # insertion-ordered set: repeated docstrings are kept once
    for path in stdlib_sources():
        for doc in _docstrings(path):
            if len(doc) >= MIN_DOC_CHARS:
                docs.setdefault(doc)
    for doc in _help_topics(stdlib / "pydoc_data" / "topics.py"):
        docs.setdefault(doc)
    return list(docs)


def _docstrings(path: Path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings about escapes in old sources
        try:
            tree = ast.parse(path.read_bytes())
        except SyntaxError:
            return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def _help_topics(path: Path) -> list[str]:
    """The texts of pydoc's help topics (the language reference): a dict of string literals."""
    if not path.is_file():
        return []
    tree = ast.parse(path.read_bytes())
    return [v.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
            for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]


def configured_tokenizer(tokenizer_dir: str | None) -> Tokenizer:
    """The tokenizer a run reads its data with: `data.tokenizer` (`tokenizer_dir`), else the
    built-in corpus's."""
    return load_tokenizer(tokenizer_dir or ensure_sample_corpus().tokenizer_dir)


def ensure_sample_corpus(root: Path | None = None) -> SampleCorpus:
    """Return the sample corpus, building it first if it is not in the cache yet."""
    final = corpus_dir(root)
    corpus = SampleCorpus(prefix=str(final / "corpus"), tokenizer_dir=str(final / "tokenizer"))
    if final.is_dir():  # only ever created by an atomic rename of a finished build
        return corpus
    final.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent processes (ranks, tests) wait for one build instead of each
    # building; the rename keeps things correct where locks do not work (some network filesystems).
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return corpus
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            _build(tmp)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process finished first: its corpus is identical, keep it.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return corpus


def _build(out: Path) -> None:
    docs = sample_documents()
    tokenizer_dir = out / "tokenizer"
    _train_tokenizer(docs).save_pretrained(str(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)  # tokenize through the same path users load
    chunks = range(0, len(docs), TOKENIZE_CHUNK)
    ids = []
    for start in tqdm(chunks, desc="tokenizing sample corpus", unit="chunk"):
        ids += [d + [tok.eod] for d in tok.tokenize_batch(docs[start:start + TOKENIZE_CHUNK])]
    write_indexed(str(out / "corpus"), ids, tok.vocab_size)


def _train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(docs, trainer=trainer)
    # One special token serves as document separator, bos and pad (the Tokenizer adapter reports
    # pad as absent because it equals eos, so no real token is ever masked as padding).
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, pad_token=EOT,
                                   clean_up_tokenization_spaces=False)
