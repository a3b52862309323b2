"""After training under ZeRO-1 and ZeRO-2 with EP 2 x DP 2, in fp32 and bf16: dense parameters are identical on
every rank, each expert is identical across its expert-data-parallel replicas, and different EP
ranks hold different experts."""
import json

import pytest

from conftest import launch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 ZeRO-1: DeepSpeed's BF16_Optimizer
@pytest.mark.parametrize("stage", [1, 2])
def test_replicas_after_training(stage, precision, tmp_path):
    proc = launch(tmp_path, 4, "parallel.expert=2", f"parallel.zero_stage={stage}", "train.max_steps=3",
                  f"train.precision={precision}", module="tests.workers.replicas")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPLICAS "))
    checks = json.loads(line.removeprefix("REPLICAS "))
    assert checks["dense_params"] > 0 and checks["expert_params"] > 0
    assert checks["dense_identical_over_dp"] == 1
    assert checks["experts_identical_over_expert_dp"] == 1
    assert checks["experts_differ_over_ep"] == 1
