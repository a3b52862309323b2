"""Domains and stages on two tiny corpora: a blended run reports per-domain validation and test
loss, the routes' effective composition number and the token concentration (layout-independent),
and a two-stage run writes the stage matrix and BWT, and keeps them across a restart at the stage
boundary (one that changes a finished stage's data is refused), a branch or rollback to it keeping
only the rows measured by then; separate validation and test blends are read."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import launch, metrics, run_command

from megatron_sdmoe.data import load_tokenizer
from megatron_sdmoe.training.stage_matrix import backward_transfer


def test_blend_reports_domains_and_route_composition(domains, tmp_path):
    blend = [f"data.path=[1, {domains['prose']}, 1, {domains['shout']}]", f"data.tokenizer={domains['tokenizer']}",
             "moe.diag_interval=2", "moe.diag_rank=4", "moe.diag_position_buckets=2", "train.eval_interval=2",
             "data.split=96,2,2"]
    runs = {"one": (1, []), "TP2": (2, ["parallel.tensor=2"]), "EP2": (2, ["parallel.expert=2"])}
    results = {}
    for name, (nproc, overrides) in runs.items():
        launch(tmp_path / name, nproc, *blend, *overrides)
        results[name] = {row["step"]: row for row in metrics(tmp_path / name)}
    one = results["one"]
    for step in (2, 4):
        # both domains are evaluated; an upper-cased corpus is a different distribution
        assert abs(one[step]["val_loss_prose"] - one[step]["val_loss_shout"]) > 0.01
        assert all(1.0 <= n <= 4.0 for n in one[step]["route_neff"])  # 2 domains x 2 position buckets
        for name in ("TP2", "EP2"):
            got = results[name][step]
            for key in ("val_loss", "val_loss_prose", "val_loss_shout"):
                assert got[key] == pytest.approx(one[step][key], abs=2e-5), (name, key)
            assert got["route_neff"] == pytest.approx(one[step]["route_neff"], abs=1e-9), name
            assert got["val_token_concentration"] == pytest.approx(one[step]["val_token_concentration"],
                                                                   abs=1e-9), name
    # the test set, per domain too, once at the last step (4), also in TensorBoard
    assert abs(one[4]["test_loss_prose"] - one[4]["test_loss_shout"]) > 0.01 and "test_loss" not in one[2]
    events = EventAccumulator(str(tmp_path / "one" / "tb"))
    events.Reload()
    test_scalars = [(e.step, e.value) for e in events.Scalars("test/loss_shout")]
    assert test_scalars == [(4, pytest.approx(one[4]["test_loss_shout"]))]
    for name in ("TP2", "EP2"):
        for key in ("test_loss", "test_loss_prose", "test_loss_shout"):
            assert results[name][4][key] == pytest.approx(one[4][key], abs=2e-5), (name, key)


def test_two_stages_write_the_matrix_and_bwt_and_survive_a_restart(domains, tmp_path):
    stages = [f"data.stages=[{{name: prose, steps: 3, path: [{domains['prose']}]}}, "
              f"{{name: shout, steps: 3, path: [{domains['shout']}]}}]",
              f"data.tokenizer={domains['tokenizer']}", "train.max_steps=6", "data.split=96,2,2",
              "train.save_interval=3"]
    launch(tmp_path / "straight", 1, *stages)
    result = json.loads((tmp_path / "straight" / "stages.json").read_text())
    (l00,), (l10, l11) = result["loss"]
    assert result["stages"] == ["prose", "shout"]
    assert result["bwt"] == pytest.approx(l10 - l00)
    assert (tmp_path / "straight" / "stages.png").stat().st_size > 0
    rows = {row["step"]: row for row in metrics(tmp_path / "straight")}
    assert rows[3]["stage_loss_prose"] == pytest.approx(l00) and "bwt" not in rows[3]
    assert rows[6]["bwt"] == pytest.approx(result["bwt"])
    assert "test_loss" in rows[6] and "test_loss" not in rows[3]  # the last stage's test set, at the end
    # stop at the stage boundary, start again: the same matrix, bit for bit
    launch(tmp_path / "restarted", 1, *stages, "train.exit_interval=3")
    assert len(json.loads((tmp_path / "restarted" / "stages.json").read_text())["loss"]) == 1
    # a finished stage's data changed on the way: its row was measured on the old data, so refused
    changed = stages[0].replace(f"path: [{domains['prose']}]}}", f"path: [{domains['shout']}]}}")
    proc = launch(tmp_path / "restarted", 1, changed, *stages[1:], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: data.stages[0] ended at step 3 (the checkpoint is at step 3), and the stage matrix holds losses on "
        f"its data: keep its path and valid_path as the run had them (['{domains['prose']}'], []), or start a new "
        "run.dir"], proc.stderr
    # the first stage ended at step 3: steps that would have ended it at 2 never evaluated it there
    shorter = stages[0].replace("steps: 3, path", "steps: 2, path", 1).replace("steps: 3, path", "steps: 4, path")
    proc = launch(tmp_path / "restarted", 1, shorter, *stages[1:], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: data.stages would have ended at steps [2] by the checkpoint's step 3, but the run's ended at [3]: "
        "each stage's evaluation and data position follow from them; keep the steps of the stages up to there "
        "(later ones may change)"], proc.stderr
    launch(tmp_path / "restarted", 1, *stages)
    assert json.loads((tmp_path / "restarted" / "stages.json").read_text()) == result
    # a branch from the stage boundary, and the run rolled back to it, hold the first stage's row
    # alone until the second stage ends again (as their metrics hold no line past step 3)
    branch = tmp_path / "branch"
    for args in (("branch", tmp_path / "straight", 3, branch), ("rollback", tmp_path / "straight", 3)):
        assert run_command("megatron_sdmoe.checkpoints", *args).returncode == 0
    assert json.loads((branch / "stages.json").read_text()) == {**result, "loss": [[l00]], "bwt": None}
    launch(tmp_path / "straight", 1, *stages, "train.exit_interval=4")
    assert json.loads((tmp_path / "straight" / "stages.json").read_text())["loss"] == [[l00]]
    launch(branch, 1, *stages)
    assert json.loads((branch / "stages.json").read_text()) == result


@pytest.mark.filterwarnings("ignore:Could not determine rank")
def test_a_stage_draws_a_corpus_an_earlier_stage_trained_on_in_another_order(domains, tmp_path):
    """Replaying a corpus (here all of the second stage's) draws other samples than the ones the
    first stage began with: each stage shuffles with its own seed."""
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.training.stages import build_stages

    cfg = load_config(None, [f"run.dir={tmp_path}", f"data.tokenizer={domains['tokenizer']}", "train.max_steps=8",
                             f"data.stages=[{{name: a, steps: 4, path: [{domains['prose']}]}}, "
                             f"{{name: b, steps: 4, path: [{domains['prose']}]}}]"])
    first, second = build_stages(cfg, load_tokenizer(domains["tokenizer"]))
    drawn = [[stage.train[i]["tokens"].tolist() for i in range(16)] for stage in (first, second)]
    assert not any(sample in drawn[0] for sample in drawn[1])


@pytest.mark.filterwarnings("ignore:Could not determine rank")
def test_separate_validation_blend(domains, tmp_path):
    """data.valid_path: validation samples come from that blend only (here: the upper-cased corpus)."""
    from megatron_sdmoe.config import load_config
    from megatron_sdmoe.data import build_datasets

    cfg = load_config(None, [f"run.dir={tmp_path}", f"data.path=[{domains['prose']}]",
                             f"data.valid_path=[{domains['shout']}]", f"data.tokenizer={domains['tokenizer']}"])
    tok = load_tokenizer(domains["tokenizer"])
    train, valid, test = build_datasets(cfg, tok, 16, 16)
    assert test is None  # the training blend is used whole

    def text(dataset, i):  # without the end-of-document token's own (lower-case) text
        return tok.detokenize([t for t in dataset[i]["tokens"].tolist() if t != tok.eod])

    assert all(text(valid, i) == text(valid, i).upper() for i in range(16))
    assert any(text(train, i) != text(train, i).upper() for i in range(16))


def test_separate_test_blend(domains, tmp_path):
    """data.test_path: the test set comes from that blend, reported by its datasets' names. Here it
    is the validation blend with its datasets in the other order (the same samples, each under its
    other dataset id), so the final per-dataset test losses equal the validation losses."""
    prose, shout = domains["prose"], domains["shout"]
    proc = launch(tmp_path / "run", 1, f"data.path=[{prose}]", f"data.valid_path=[1, {prose}, 1, {shout}]",
                  f"data.test_path=[1, {shout}, 1, {prose}]", f"data.tokenizer={domains['tokenizer']}",
                  "train.eval_interval=2")
    assert [line for line in proc.stdout.splitlines() if line.startswith("note: ")] == [  # training data in both
        f"note: the {setting} blend of stage main holds {prose}, which the stage trains on: its losses there are "
        "measured on training documents" for setting in ("valid_path", "test_path")]
    rows = {row["step"]: row for row in metrics(tmp_path / "run")}
    assert [step for step, row in rows.items() if "test_loss" in row] == [4]  # once, at train.max_steps
    for name in ("prose", "shout"):
        assert rows[4][f"test_loss_{name}"] == pytest.approx(rows[4][f"val_loss_{name}"], rel=1e-6), name
    assert abs(rows[4]["test_loss_prose"] - rows[4]["test_loss_shout"]) > 0.01


def test_backward_transfer_of_three_stages():
    """docs/methods.md section 4: BWT = mean over j < n of L[n][j] - L[j][j], here n = 2."""
    rows = [[2.0], [2.5, 1.5], [3.0, 2.25, 1.0]]  # row i: losses on stages 0..i after stage i
    assert backward_transfer(rows) == ((3.0 - 2.0) + (2.25 - 1.5)) / 2
    assert backward_transfer(rows[:1]) is None  # nothing learnt before the first stage
