"""Data: tokenizer adapter, built-in sample corpus, Megatron .bin/.idx writer, GPT datasets."""
from megatron_sdmoe.data.datasets import build_datasets, get_batch, parse_blend
from megatron_sdmoe.data.indexed import write_indexed
from megatron_sdmoe.data.sample_corpus import SampleCorpus, ensure_sample_corpus, sample_documents
from megatron_sdmoe.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["SampleCorpus", "Tokenizer", "build_datasets", "ensure_sample_corpus", "get_batch",
           "load_tokenizer", "parse_blend", "sample_documents", "write_indexed"]
