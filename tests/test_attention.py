"""Core attention: torch's fused kernel (models/attention.py) equals megatron-core's local
DotProductAttention in outputs and gradients, causal and within documents (data.document_mask);
with the document mask a packed document's logits are those of the document alone, so are the
per-token losses training takes on a packed micro-batch, and training does not depend on the layout."""
import pytest
import torch

from conftest import REPO, launch, metrics

from megatron_sdmoe.models.attention import document_attention_mask

DOCUMENTS = torch.tensor([[0, 5, 13, 24, 24], [0, 24, 24, 24, 24], [0, 1, 2, 20, 24]])  # cu_seqlens of 3 samples


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "document mask"])
@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2)])
def test_sdpa_attention_equals_megatron_dot_product_attention(single_process_groups, heads, groups, documents):
    """models/attention.py against megatron-core's local DotProductAttention (causal, GQA, fp32)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_sdmoe.models.attention import SDPAttention
    from megatron_sdmoe.runtime import seed_everything

    seed_everything(0)  # megatron-core's attention forks its (dropout) RNG state

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                               use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    reference, ours = DotProductAttention(**args), SDPAttention(**args)
    s, b, d = 24, 3, 64 // heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(s, b, groups, d, generator=gen, requires_grad=True) for _ in range(2))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    if documents:
        mask = document_attention_mask(DOCUMENTS, s)
        want, got = reference(q, k, v, mask), ours(q, k, v, mask)
    else:
        want, got = reference(q, k, v, causal), ours(q, k, v, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["tiny-qwen3-moe.yaml", "tiny-deepseek.yaml"])  # GQA; MLA with a dense layer
def test_a_packed_document_gives_its_logits_alone(single_process_groups, config):
    """Documents of 20 and 28 tokens in one sequence: with the document mask the second one's
    logits are those of the model on it alone (RoPE sees only relative positions); without, not."""
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.models import build_model
    from megatron_sdmoe.runtime import seed_everything

    cfg = load_config(REPO / "configs" / config)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, 1000, torch.float32).eval()
    tokens = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))

    def logits(t, mask=None):
        return model(t, torch.arange(t.shape[1])[None], mask)[0]

    with torch.no_grad():
        alone = logits(tokens[:, 20:])
        packed = logits(tokens, document_attention_mask(torch.tensor([[0, 20, 48]]), 48))
        unmasked = logits(tokens)
    torch.testing.assert_close(packed[20:], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[:20], unmasked[:20], rtol=1e-5, atol=1e-5)  # the first: causal alone
    assert (unmasked[20:] - alone).abs().max() > 1e-2


def test_document_mask_training_at_tp2_equals_one_process(tmp_path):
    """Sequence parallelism gathers the sequence before attention: the mask covers all of it."""
    for name, nproc, layout in (("one", 1, []), ("tp2", 2, ["parallel.tensor=2"])):
        launch(tmp_path / name, nproc, "data.document_mask=true", *layout)
    for got, want in zip(metrics(tmp_path / "tp2"), metrics(tmp_path / "one"), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-5), got["step"]
        # the grad norm's round-off grows as in test_parallel_parity (1.2e-4 at step 4 here)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-4), got["step"]


def test_training_losses_of_a_packed_micro_batch_are_its_documents_alone(tmp_path):
    """The per-token losses training takes (Trainer._forward on the real setup's engine) with
    data.document_mask, against a reference that needs no mask: the same model on each document of
    the micro-batch alone, with the position ids training gives it (megatron-core's
    inter_document_masking restarts them at each document, whatever reset_position_ids says)."""
    launch(tmp_path / "run", 1, "data.document_mask=true", "train.micro_batch_size=4", "train.precision=fp32",
           str(tmp_path / "losses.pt"), module="tests.workers.document_mask")
    got = torch.load(tmp_path / "losses.pt")
    packed, cu_seqlens, positions = got["packed"], got["cu_seqlens"], torch.arange(64).expand(4, 64)
    starts = cu_seqlens.gather(1, torch.searchsorted(cu_seqlens, positions.contiguous(), right=True) - 1)
    assert torch.equal(got["position_ids"], positions - starts)
    torch.testing.assert_close(packed, got["alone"], rtol=1e-5, atol=1e-5)
    later = positions >= cu_seqlens[:, 1:2]  # the tokens after each sample's first document
    assert later.sum() >= 64  # the samples hold several documents
    # without the mask most of them see the documents before theirs; the first is causal either way
    assert ((packed - got["unmasked"]).abs() > 1e-2)[later].float().mean() > 0.5
    torch.testing.assert_close(packed[~later], got["unmasked"][~later], rtol=1e-5, atol=1e-5)
