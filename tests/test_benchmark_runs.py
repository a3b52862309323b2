"""What benchmark runs rely on: train.profile_steps records exactly the chosen optimizer steps on
every rank (those that train, when batches are skipped), train.final_checkpoint=false writes no
checkpoint (a 3.7B model's would be 50 GB), and an SD-MoE config trains its topk baseline
(benchmarks/overhead.py switches moe.variant) with a note on the SD-MoE settings it leaves idle."""
import json

from conftest import launch


def test_profile_of_the_chosen_steps_and_no_final_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, 2, "parallel.expert=2", "moe.variant=sdmoe", "train.profile_steps=[2, 3]",
                  "train.final_checkpoint=false", "sdmoe.refresh_interval=2")
    # 2 steps x 2 micro-batches per rank (global batch 8 = 2 DP ranks x 2 x micro-batch 2)
    # x 2 layers x 2 weights (fc1, fc2): SD-MoE's autograd function, forward and backward
    expected = 2 * 2 * 2 * 2
    for rank in (0, 1):
        events = json.loads((run / "profile" / f"trace_rank{rank}.json").read_text())["traceEvents"]
        names = [event.get("name") for event in events]
        assert names.count("SpectralSplit") == expected and names.count("SpectralSplitBackward") == expected
        # one grouped GEMM per SD-MoE weight forward, two backward (input and weight gradients).
        # Counted in the trace, not the table: the table keeps the top operators by self time,
        # and which those are depends on the machine
        assert names.count("aten::_grouped_mm") == 3 * expected
        table = (run / "profile" / f"ops_rank{rank}.txt").read_text()
        assert table.startswith("steps 2-3") and "Self CPU time total" in table
        assert "sdmoe_refresh_bases: 1 calls" in table  # step 3 (index 2) refreshes the bases
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert not (run / "checkpoints").exists() and "checkpoint: none" in proc.stdout


def test_profile_starts_at_the_first_step_that_trains(tmp_path):
    """Step 2's batch skipped: the profile holds step 3 alone (it had started at step 2 only)."""
    proc = launch(tmp_path, 1, "train.profile_steps=[2, 3]", "train.skip_batches=[2]", "sdmoe.rank=4")
    assert "note: sdmoe.rank=4 does nothing without moe.variant=sdmoe or headwise_sdmoe" in proc.stdout
    names = [event.get("name") for event in
             json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())["traceEvents"]]
    # one step: 4 micro-batches (global batch 8 of 2) x 2 layers x (2 grouped GEMMs forward, 4 backward)
    assert names.count("aten::_grouped_mm") == 4 * 2 * 6
