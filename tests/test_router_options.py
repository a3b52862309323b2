"""Router options reach megatron-core's router and keep the loss layout-independent: sigmoid scores
on a Qwen-like model (each routed weight proportional to sigmoid of its logit, not to exp), z-loss,
and an expert capacity that drops tokens."""
import pytest
import torch

from conftest import CONFIG, SMALL, launch, metrics
from megatron_sdmoe.config import load_config
from megatron_sdmoe.models import build_model

OPTIONS = ["moe.score_function=sigmoid", "moe.z_loss_coeff=0.001", "moe.capacity_factor=0.5",
           "moe.token_drop_policy=probs"]


def test_capacity_z_loss_and_sigmoid_scores(tmp_path):
    launch(tmp_path / "one", 1, *OPTIONS)
    launch(tmp_path / "ep2", 2, *OPTIONS, "parallel.expert=2")
    one, ep2 = metrics(tmp_path / "one"), metrics(tmp_path / "ep2")
    # Half an even share per expert keeps at most half of the routed (token, expert) pairs.
    assert all(0.5 <= dropped < 1 for row in one for dropped in row["expert_dropped_fraction"])
    assert all(row["z_loss"] > 0 for row in one)
    # EP2 runs the same micro-batches per rank, so capacity (per rank's tokens) drops the same ones.
    for got, want in zip(ep2, one, strict=True):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "expert_dropped_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=2e-5), (key, got["step"])
    assert one[-1]["loss"] < one[0]["loss"]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_the_score_function_weights_the_chosen_experts(single_process_groups, score):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    model = build_model(load_config(CONFIG, [*SMALL, f"moe.score_function={score}"]), 512, torch.float32).eval()
    router = next(m.router for m in model.modules() if isinstance(m, MoELayer))
    hidden = router.weight.shape[1]
    x = torch.randn(6, 2, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs, routing_map = router(x)
        logits = x.view(-1, hidden) @ router.weight.T
    topk = int(routing_map.sum(-1)[0])
    assert topk > 1 and torch.equal(routing_map, torch.zeros_like(routing_map).scatter(-1, logits.topk(topk).indices, True))
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.exp(logits)
    ratios = (probs[routing_map] / scores[routing_map]).view(-1, topk)  # one per token: a normalisation
    torch.testing.assert_close(ratios, ratios[:, :1].expand_as(ratios))
