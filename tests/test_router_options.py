"""Router options reach megatron-core's router and keep the loss layout-independent: sigmoid scores
on a Qwen-like model, z-loss, and an expert capacity that drops tokens."""
import pytest

from conftest import launch, metrics

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
