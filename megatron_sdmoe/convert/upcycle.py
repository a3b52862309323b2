"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a dense transformers Qwen3 model
(Qwen3ForCausalLM) seen as a Qwen3-MoE model whose routed experts are each a copy of its layer's
MLP and whose routers are drawn fresh, then imported as `from-hf` imports any Qwen3-MoE model.

With top-k > 1 (normalised: the chosen experts' weights sum to 1) the upcycled model computes the
dense model's function exactly at the start, whatever the router chooses; training lets the
experts diverge. Top-1 routing scales each token's MLP output by its routing probability. With
`moe.variant=sdmoe` the copies are SD-MoE's common part and the unique parts start at zero.
A tied output layer (the small Qwen3 models') is untied: it starts as a copy of the embedding.
"""
from __future__ import annotations

import re

import torch

from megatron_sdmoe.config import MoEConfig
from megatron_sdmoe.errors import UserError

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight")
ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")
ROUTER_SEED = 1234  # each layer's router is drawn from a generator seeded with this plus its index


def moe_config(dense, moe: MoEConfig):
    """The Qwen3MoeConfig of the upcycled model: the dense config's fields, moe.num_experts routed
    experts as wide as its MLP, top-moe.topk routing."""
    from transformers import Qwen3MoeConfig

    if (dense.architectures or [None])[0] != DENSE_ARCHITECTURE:
        raise UserError(f"upcycle reads a dense {DENSE_ARCHITECTURE}, not architectures={dense.architectures}: "
                        "import MoE models with sdmoe-convert from-hf")
    if moe.variant not in ("topk", "sdmoe"):  # head-wise experts take a head's slice, not the whole hidden state
        raise UserError(f"moe.variant={moe.variant} experts take d/H-wide head slices, so they cannot copy the dense "
                        "MLP: upcycle with moe.variant=topk or sdmoe")
    experts, topk = moe.num_experts, moe.topk
    if not 1 <= topk <= experts:
        raise UserError(f"moe.topk={topk} with moe.num_experts={experts}: choose 1 <= topk <= experts")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
              "rope_parameters", "attention_bias", "use_sliding_window", "sliding_window", "dtype")
    return Qwen3MoeConfig(**{field: getattr(dense, field) for field in fields}, tie_word_embeddings=False,
                          intermediate_size=dense.intermediate_size, moe_intermediate_size=dense.intermediate_size,
                          num_experts=experts, num_experts_per_tok=topk, norm_topk_prob=topk > 1,
                          decoder_sparse_step=1, mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"])


class UpcycledWeights:
    """A dense model's weights read as the upcycled model's (the interface of weights.WeightDirectory):
    `model.layers.<i>.mlp.experts.<e>.*` is layer i's MLP for every e, `model.layers.<i>.mlp.gate`
    a fresh router [experts, hidden] drawn from N(0, initializer_range^2), `lm_head` the embedding
    where the dense model ties them."""

    def __init__(self, source, config):
        self.source, self.config = source, config
        self.tied = "lm_head.weight" not in source

    def names(self) -> list[str]:
        names = [name for name in self.source.names() if not MLP.fullmatch(name)]
        for layer in range(self.config.num_hidden_layers):
            names.append(f"model.layers.{layer}.mlp.gate.weight")
            names += [f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for e in range(self.config.num_experts)
                      for p in ("gate_proj", "up_proj", "down_proj")]
        return names + ["lm_head.weight"] * self.tied

    def _dense_name(self, name: str) -> str:
        expert = EXPERT.fullmatch(name)
        if expert:
            return f"model.layers.{expert.group(1)}.mlp.{expert.group(2)}.weight"
        return "model.embed_tokens.weight" if name == "lm_head.weight" and self.tied else name

    def tensor(self, name: str) -> torch.Tensor:
        router = ROUTER.fullmatch(name)
        if router is None:
            return self.source.tensor(self._dense_name(name))
        embedding = self.source.placeholder("model.embed_tokens.weight")
        generator = torch.Generator().manual_seed(ROUTER_SEED + int(router.group(1)))
        weight = torch.randn(self.config.num_experts, self.config.hidden_size, generator=generator)
        return (weight * self.config.initializer_range).to(embedding.dtype)

    def placeholder(self, name: str) -> torch.Tensor:
        if ROUTER.fullmatch(name):
            dtype = self.source.placeholder("model.embed_tokens.weight").dtype
            return torch.empty(self.config.num_experts, self.config.hidden_size, dtype=dtype, device="meta")
        return self.source.placeholder(self._dense_name(name))
