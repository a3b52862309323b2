"""Bad input that only the files show, each refused with one line `error: <problem>: <fix>` and
exit code 2 before anything is written: data files missing or too small to give one sample, a
checkpoint saved by another model, vocabulary or parallel layout (or an incomplete one, or one
with a rank file cut short or missing), an
unwritable run directory, a tokenizer with more tokens than the model's vocabulary, files or
directories that not every rank sees. Config typos and impossible layouts are test_config.py's."""
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, SMALL, launch, python_m
from megatron_sdmoe.config import load_config
from megatron_sdmoe.data.datasets import checked_blends
from megatron_sdmoe.data.indexed import write_indexed
from megatron_sdmoe.errors import UserError
from megatron_sdmoe.training.checkpoint import latest_checkpoint
from megatron_sdmoe.training.resume_checks import check_resumable

NODE_LOCAL = "tests.workers.node_local"  # each rank in a working directory of its own, as on different nodes


def train(run_dir, *overrides, world: int = 1) -> subprocess.CompletedProcess:
    """sdmoe-train in `world` processes."""
    return launch(run_dir, world, *overrides, check=False)


def assert_refused(proc, start: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), proc.stderr[-3000:]
    return lines[0]


def snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def corpus(prefix, documents: int, tokens_each: int) -> str:
    """`documents` documents of `tokens_each` tokens, the last an end-of-document (id 0)."""
    write_indexed(str(prefix), [[7] * (tokens_each - 1) + [0]] * documents, 1000)
    return str(prefix)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory with a checkpoint at step 2 (one process, SMALL)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    launch(run_dir, 1, "train.max_steps=2")
    return run_dir


@pytest.fixture
def resumed(saved_run, tmp_path):
    """A copy of saved_run to resume into, and its files before."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    return run_dir, snapshot(run_dir)


def test_data_too_small_for_one_sample(tmp_path):
    # 10 documents of 6 tokens: the 98% train split holds 60 tokens, fewer than 65.
    tiny = corpus(tmp_path / "tiny", 10, 6)
    proc = train(tmp_path / "run", f"data.path=[{tiny}]", f"data.tokenizer={tmp_path}")
    line = assert_refused(proc, f"error: the train split of {tiny} holds 60 tokens (10 documents), fewer than one "
                                "sample (data.seq_length + 1 = 65)")
    assert "larger corpus" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["data.path", "data.stages[1].valid_path"])
def test_data_missing(setting, tmp_path):
    nope = tmp_path / "nope"
    if setting == "data.path":
        data = [f"data.path=[{nope}]"]
    else:  # the error names the setting that holds the missing prefix
        big = corpus(tmp_path / "big", 100, 20)
        stages = f"{{path: [{big}], valid_path: [{big}], steps: 1}}, {{path: [{big}], valid_path: [{nope}], steps: 1}}"
        data = [f"data.stages=[{stages}]", "train.eval_samples=2", "train.max_steps=2"]
    proc = train(tmp_path / "run", *data, f"data.tokenizer={tmp_path}")
    assert_refused(proc, f"error: {setting} prefix {nope} has no {nope}.bin")
    assert not (tmp_path / "run").exists()


def test_an_error_exit_destroys_the_process_group(tmp_path):
    """Gloo's worker threads left to interpreter finalization can abort a process after its error
    line (exit 134; pytorch PR 179291). In a fresh process: the forked test ranks end with
    os._exit, which runs no exit handlers."""
    proc = python_m("tests.workers.exit_state", CONFIG, f"run.dir={tmp_path / 'run'}", *SMALL,
                    f"data.path=[{tmp_path / 'nope'}]", f"data.tokenizer={tmp_path}")
    assert_refused(proc, f"error: data.path prefix {tmp_path / 'nope'} has no")
    assert proc.stdout.splitlines()[-1] == "process group alive at exit: False"


@pytest.mark.parametrize("damage", ["idx cut short", "no documents"])
def test_data_megatron_cannot_read(damage, tmp_path):
    """megatron's reader fails on both with a traceback."""
    prefix = corpus(tmp_path / "data", 100, 70)
    if damage == "idx cut short":
        idx = tmp_path / "data.idx"
        idx.write_bytes(idx.read_bytes()[:30])
        message = f"error: {idx} is not a readable Megatron index ("
    else:
        write_indexed(prefix, [], 1000)
        message = f"error: {prefix} holds no documents: leave it out, or re-create it from input with text"
    proc = train(tmp_path / "run", f"data.path=[{prefix}]", f"data.tokenizer={tmp_path}")
    assert_refused(proc, message)
    assert not (tmp_path / "run").exists()


def test_data_bin_cut_short(tmp_path):
    """A .bin copied in part: megatron's reader trusts the index and would read past its end."""
    prefix = corpus(tmp_path / "big", 200, 100)
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    proc = train(tmp_path / "run", f"data.path=[{prefix}]", f"data.tokenizer={tmp_path}")
    assert_refused(proc, f"error: {prefix}.idx does not match {prefix}.bin: its sequence lengths add up to 20000 "
                         "tokens of 2 bytes, but the .bin has 39998 bytes: re-create both with sdmoe-preprocess")
    assert not (tmp_path / "run").exists()


def test_validation_blend_too_small(tmp_path):
    big, tiny = corpus(tmp_path / "big", 100, 20), corpus(tmp_path / "tiny", 2, 20)
    proc = train(tmp_path / "run", f"data.path=[{big}]", f"data.valid_path=[{tiny}]", f"data.tokenizer={tmp_path}",
                 "train.eval_interval=2")
    assert_refused(proc, f"error: the validation split of {tiny} holds 40 tokens")
    assert not (tmp_path / "run").exists()


def test_test_blend_too_small(tmp_path):
    big, tiny = corpus(tmp_path / "big", 100, 20), corpus(tmp_path / "tiny", 2, 20)
    proc = train(tmp_path / "run", f"data.path=[{big}]", f"data.valid_path=[{big}]", f"data.test_path=[{tiny}]",
                 f"data.tokenizer={tmp_path}")
    assert_refused(proc, f"error: the test split of {tiny} holds 40 tokens")
    assert not (tmp_path / "run").exists()


def test_test_split_too_small(tmp_path):
    # 100 documents of 20 tokens; data.split=95,4,1 leaves the test set 1 document: 20 tokens.
    data = corpus(tmp_path / "data", 100, 20)
    cfg = load_config(CONFIG, SMALL + ["data.split=95,4,1"])
    with pytest.raises(UserError, match=re.escape(f"the test split of {data} holds 20 tokens (1 documents)")):
        checked_blends(cfg, [data], [], [], 8, 8)
    checked_blends(cfg, [data], [], [], 8, 0)  # nothing evaluated: no test set is read


def test_one_sample_is_enough(tmp_path):
    """The bound is exact: a split of seq_length + 1 tokens passes, one token fewer does not."""
    cfg = load_config(CONFIG, SMALL + ["data.split=1"])
    checked_blends(cfg, [corpus(tmp_path / "exact", 5, 13)], [], [], 1, 0)
    with pytest.raises(UserError, match="holds 64 tokens"):
        checked_blends(cfg, [corpus(tmp_path / "short", 4, 16)], [], [], 1, 0)


def test_samples_past_what_an_index_holds(tmp_path):
    """A typo's extra zeros in train.max_steps: refused, not megatron-core counting 10**8 passes over
    100 documents one at a time; as many passes as fit in memory are fine."""
    cfg = load_config(CONFIG, SMALL + ["data.split=1"])
    data = corpus(tmp_path / "data", 100, 20)  # 2,000 tokens
    with pytest.raises(UserError, match=re.escape(
            f"10,000,000,000 train samples would read the train split of {data} (2,000 tokens) 320,000,000 times, "
            "an index of 32,000,000,000 documents: lower train.max_steps or train.global_batch_size")):
        checked_blends(cfg, [data], [], [], 10 ** 10, 0)
    checked_blends(cfg, [data], [], [], 10 ** 6, 0)  # 32,000 passes


def test_checkpoint_of_another_model(resumed):
    run_dir, before = resumed
    proc = train(run_dir, "model.hidden_size=128", "moe.ffn_hidden_size=32")
    assert_refused(proc, f"error: checkpoint {run_dir / 'checkpoints' / 'step_00000002'} was saved by another model "
                         "(model.hidden_size: 64 -> 128, moe.ffn_hidden_size: 64 -> 32): keep the checkpoint's "
                         "settings (another model trains in a new run.dir)")
    assert snapshot(run_dir) == before  # config.yaml and checkpoint untouched


def test_checkpoint_of_another_vocabulary(resumed, tmp_path):
    """Another tokenizer (data.tokenizer is no model setting: the embedding's rows tell)."""
    from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer

    run_dir, before = resumed
    tokenizer = load_tokenizer(ensure_sample_corpus().tokenizer_dir).hf
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(200)])
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # ids as before: the corpus passes
    proc = train(run_dir, f"data.tokenizer={tmp_path / 'tokenizer'}", f"data.path=[{ensure_sample_corpus().prefix}]")
    assert_refused(proc, f"error: checkpoint {run_dir / 'checkpoints' / 'step_00000002'} has a vocabulary of 4096 "
                         "rows, but this run's tokenizer and model.vocab_size give 4352: resume with")
    assert snapshot(run_dir) == before


def test_another_global_batch_size_on_resume(resumed):
    run_dir, before = resumed
    proc = train(run_dir, "train.global_batch_size=16")
    assert_refused(proc, f"error: checkpoint {run_dir / 'checkpoints' / 'step_00000002'} was trained with "
                         "train.global_batch_size=8, not 16: the data position counts global batches, so other "
                         "batches would skip or repeat samples; resume with train.global_batch_size=8")
    assert snapshot(run_dir) == before


def test_training_settings_may_change_on_resume(resumed):
    run_dir, _ = resumed
    check_resumable(load_config(CONFIG, SMALL + [f"run.dir={run_dir}", "moe.aux_loss_coeff=0.05",
                                                 "moe.diag_interval=5", "train.lr=0.001"]), 1,
                    latest_checkpoint(run_dir))


def test_sequential_experts_at_another_expert_parallel_size(tmp_path):
    """megatron-core's SequentialMLP names experts by local index: its weights cannot move between EP ranks."""
    run_dir = tmp_path / "run"
    launch(run_dir, 1, "moe.expert_impl=sequential", "train.max_steps=2")
    before = snapshot(run_dir)
    proc = train(run_dir, "moe.expert_impl=sequential", "parallel.expert=2", world=2)
    assert_refused(proc, f"error: checkpoint {run_dir / 'checkpoints' / 'step_00000002'}: megatron-core's sequential "
                         "experts name their weights by local index, so they cannot move between EP ranks: resume "
                         "with parallel.tensor=1, parallel.expert=1 and parallel.expert_tensor=1")
    assert snapshot(run_dir) == before


def test_checkpoint_of_an_older_version_at_another_layout(resumed):
    """Without the split records' global expert indices, the tensors cannot be re-cut for another
    TP / EP layout; without the ranks' places (meta.json `ranks`), not even the ZeRO partitions for
    another data-parallel size."""
    run_dir, _ = resumed
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    rank_file = checkpoint / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=False)
    state["shards"] = {name: {k: v for k, v in split.items() if k not in ("first", "weight")}
                       for name, split in state["shards"].items()}
    torch.save(state, rank_file)
    before = snapshot(run_dir)
    assert_refused(train(run_dir, "parallel.expert=2", world=2),
                   f"error: checkpoint {checkpoint} was saved by an older version, without the split records that "
                   "resuming at another model-parallel layout needs: resume with parallel.tensor=1, "
                   "parallel.expert=1 and parallel.expert_tensor=1")
    assert snapshot(run_dir) == before
    meta_file = checkpoint / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["ranks"]
    meta_file.write_text(json.dumps(meta))
    before = snapshot(run_dir)
    assert_refused(train(run_dir, world=2), f"error: checkpoint {checkpoint} was saved by an older version with "
                                            "layout {'world_size': 1, 'tensor': 1, 'expert': 1, 'expert_tensor': 1}, "
                                            "without the ranks' places that resuming with layout {'world_size': 2, "
                                            "'tensor': 1, 'expert': 1, 'expert_tensor': 1} needs: resume with its "
                                            "layout")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["cut short", "missing", "bytes changed"])
def test_a_rank_file_cut_short_or_missing(damage, tmp_path):
    """As a copy that stopped leaves it, or a disk that flipped bytes in a tensor (which torch.load
    would read silently): refused by the rank that checks that file (each checks its share), in
    the saved layout and in another, and by conversion, instead of one rank failing while the
    others wait."""
    from conftest import run_command

    run_dir, layout = tmp_path / "run", "parallel.expert=2"
    launch(run_dir, 2, "train.max_steps=2", layout)
    file = run_dir / "checkpoints" / "step_00000002" / "rank_00001.pt"
    if damage == "missing":
        file.unlink()
    elif damage == "cut short":
        os.truncate(file, file.stat().st_size // 2)
    else:
        with open(file, "r+b") as f:  # in the middle: the tensors' data
            f.seek(file.stat().st_size // 2)
            f.write(b"\xff" * 64)
    before = snapshot(run_dir)
    problem = f"error: checkpoint {file.parent}: rank_00001.pt is {'missing' if damage == 'missing' else 'damaged'} ("
    line = assert_refused(train(run_dir, "train.max_steps=4", layout, world=2), problem)
    assert line.endswith(f"resume from an earlier one (sdmoe-checkpoints list / rollback {run_dir}) "
                         f"[seen on rank 1 of 2, host {socket.gethostname()}]"), line
    assert_refused(train(run_dir, "train.max_steps=4"), problem)  # one process re-cutting EP2: checks both files
    assert_refused(run_command("megatron_sdmoe.convert.cli", "to-hf", run_dir, tmp_path / "hf"), problem)
    assert snapshot(run_dir) == before and not (tmp_path / "hf").exists()


def test_a_missing_latest_resumes_from_the_newest_complete_checkpoint(resumed):
    """A crash between a first save's rename and `latest`, or a `latest` deleted: the checkpoint is
    resumed, not overwritten by a run from step 0."""
    from conftest import run_command

    run_dir, _ = resumed
    (run_dir / "checkpoints" / "latest").unlink()
    rolled = run_command("megatron_sdmoe.checkpoints", "rollback", run_dir, 2)  # writes the missing `latest`
    assert rolled.returncode == 0 and (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    (run_dir / "checkpoints" / "latest").unlink()
    proc = launch(run_dir, 1, "train.max_steps=4")
    assert "resuming from step 2" in proc.stdout


def test_latest_names_a_missing_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000009")
    assert_refused(train(tmp_path / "run"), "error: checkpoint ")
    assert [p.name for p in (tmp_path / "run").rglob("*")] == ["checkpoints", "latest"]


@pytest.mark.parametrize("how", ["parent is a file", "directory this user cannot write into"])
def test_unwritable_run_dir(how, tmp_path):
    if how == "parent is a file":
        (tmp_path / "file").write_text("")
        run_dir = tmp_path / "file" / "run"
    elif os.geteuid() == 0:  # root writes into read-only directories, but not into sysfs
        if not os.path.ismount("/sys"):
            pytest.skip("run as root without sysfs at /sys: nothing here is unwritable to root")
        run_dir = Path("/sys/sdmoe-run")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        run_dir = tmp_path / "ro" / "run"
    assert_refused(train(run_dir), f"error: run.dir {run_dir} is not writable (")
    assert not run_dir.exists()


def test_a_cache_dir_that_cannot_be_made_leaves_no_run_dir(tmp_path):
    (tmp_path / "file").write_text("")
    proc = train(tmp_path / "run", f"data.cache_dir={tmp_path / 'file' / 'cache'}")
    assert_refused(proc, f"error: data.cache_dir {tmp_path / 'file' / 'cache'} is not writable (Not a directory): "
                         "choose another data.cache_dir")
    assert not (tmp_path / "run").exists()


def test_vocabulary_larger_than_the_model(tmp_path):
    proc = train(tmp_path / "run", "model.vocab_size=100")
    assert_refused(proc, "error: model.vocab_size=100 is smaller than the tokenizer's ")
    assert not (tmp_path / "run").exists()


def on_own_disks(tmp_path, *overrides) -> subprocess.CompletedProcess:
    """Two ranks, each in its own working directory under tmp_path/ranks: a relative path names
    another file on each rank, as paths on node-local disks do."""
    return launch(tmp_path / "run", 2, *overrides, module=NODE_LOCAL, env={"RANK_DIRS": str(tmp_path / "ranks")},
                  check=False)


def test_data_that_one_rank_does_not_see(tmp_path):
    (tmp_path / "ranks" / "rank0").mkdir(parents=True)
    corpus(tmp_path / "ranks" / "rank0" / "data", 100, 70)  # on rank 0's disk only
    proc = on_own_disks(tmp_path, "data.path=[data]", f"data.tokenizer={tmp_path}")
    data = tmp_path / "ranks" / "rank1" / "data"  # a relative path, resolved in rank 1's working directory
    line = assert_refused(proc, f"error: data.path prefix {data} has no {data}.bin or {data}.idx: ")
    assert line.endswith(f" [seen on rank 1 of 2, host {socket.gethostname()}]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["run.dir", "data.cache_dir"])
def test_directory_that_is_not_shared_by_every_rank(setting, tmp_path):
    """Every rank writes its checkpoint shards into run.dir, and reads the index cache rank 0
    writes into data.cache_dir: refused before the first step, not at the first checkpoint."""
    proc = on_own_disks(tmp_path, f"{setting}=here")
    here = tmp_path / "ranks" / "rank1" / "here"  # rank 1's working directory's
    line = assert_refused(proc, f"error: {setting}={here} is not one directory shared by every rank (a node-local disk, "
                                "or a relative path resolved in another working directory): set ")
    assert line.endswith(f" [seen on rank 1 of 2, host {socket.gethostname()}]")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no config.yaml, no stamp left behind


def test_directories_shared_by_every_rank(tmp_path):
    """The same check passes when the paths are absolute: the ranks' own directories do not matter."""
    launch(tmp_path / "run", 2, f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1", module=NODE_LOCAL,
           env={"RANK_DIRS": str(tmp_path / "ranks")})
    assert (tmp_path / "run" / "checkpoints" / "latest").exists() and any((tmp_path / "cache").iterdir())
    assert not list(tmp_path.rglob(".shared-check-*"))


def test_weights_to_start_from_with_a_missing_shard(tmp_path):
    (tmp_path / "hf").mkdir()
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embedding.word_embeddings.weight": "model-1.safetensors"}}))
    proc = train(tmp_path / "run", f"model.init_from={tmp_path / 'hf'}")
    assert_refused(proc, f"error: {index} names shard model-1.safetensors, which is missing: ")
    proc = train(tmp_path / "run", f"model.init_from={tmp_path / 'nowhere'}")
    assert_refused(proc, f"error: weights directory {tmp_path / 'nowhere'} not found: give a directory of safetensors "
                         "weights (sdmoe-convert from-hf writes one)")
    assert not (tmp_path / "run").exists()


def test_bad_input_found_after_the_lock_leaves_the_runs_config_as_it_was(resumed):
    """Bad input in a run directory that holds a run: config.yaml is written only after the data,
    the model and its weights have passed."""
    run_dir, before = resumed
    proc = train(run_dir, "data.split=100,0,0", "train.eval_interval=2")
    assert_refused(proc, "error: data.split='100,0,0' gives the validation set no documents")
    after = snapshot(run_dir)
    assert {p: after[p] for p in before} == before  # the data index cache aside, nothing changed


@pytest.mark.parametrize("overrides, message", [
    (["data.split=100,0,0", "train.eval_interval=2"], "error: data.split='100,0,0' gives the validation set no documents"),
    (["data.tokenizer=tok"], "error: data.path is empty (the built-in sample corpus) but the tokenizer is "),
])
def test_the_sample_corpus_is_checked_before_run_dir_is_made(tmp_path, overrides, message):
    assert_refused(train(tmp_path / "run", *overrides), message)
    assert not (tmp_path / "run").exists()


def test_max_steps_before_the_checkpoint(resumed):
    """A run at step 2 restarted with train.max_steps=1 said `done` and recorded max_steps 1."""
    run_dir, before = resumed
    proc = train(run_dir, "train.max_steps=1")
    assert_refused(proc, f"error: train.max_steps=1 lies before step 2 of the checkpoint it resumes from "
                         f"({run_dir / 'checkpoints' / 'step_00000002'}): raise train.max_steps, or sdmoe-checkpoints "
                         "rollback to an earlier step")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("override, message", [
    ("train.skip_batches=[1-2]", "error: train.skip_batches has 1-2, but the checkpoint this start resumes from is at "
                                 "step 2: steps 1-2 were trained already; to leave those batches out, first "
                                 "sdmoe-checkpoints rollback "),
    # a range the checkpoint lies in: its first steps were trained, though the start said skipped
    ("train.skip_batches=[2-3]", "error: train.skip_batches has 2-3, but the checkpoint this start resumes from is at "
                                 "step 2: step 2 was trained already; to leave those batches out, first "
                                 "sdmoe-checkpoints rollback "),
    ("train.profile_steps=[1, 2]", "error: train.profile_steps=[1, 2], but the checkpoint this start resumes from is at "
                                   "step 2, past them: profile steps after 2"),
])
def test_steps_added_where_the_run_already_is(resumed, override, message):
    """The spike workflow's slip: train.skip_batches added without the rollback would skip nothing."""
    run_dir, before = resumed
    assert_refused(train(run_dir, "train.max_steps=4", override), message)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name, damage", [("meta.json", "{"), ("config.yaml", "model: ["),
                                         ("config.yaml", "run:\n  dir: /x\n")])  # cut short
def test_a_damaged_checkpoint_file_is_one_line(resumed, name, damage):
    run_dir, before = resumed
    damaged = run_dir / "checkpoints" / "step_00000002" / name
    damaged.write_text(damage)
    proc = train(run_dir)
    assert_refused(proc, f"error: checkpoint {damaged.parent}: {name} is damaged (")
    assert "copy the checkpoint again, or sdmoe-checkpoints rollback to an earlier one" in proc.stderr


def test_a_corpus_of_another_tokenizer(tmp_path):
    """Ids past the model's vocabulary (the sample tokenizer's 4096): refused at start-up, not an
    index error at the embedding (a device-side assert on a GPU)."""
    from megatron_sdmoe.data import ensure_sample_corpus

    other = str(tmp_path / "other")
    write_indexed(other, [[7, 5000, 12] * 10 + [0]] * 200, 6000)
    proc = train(tmp_path / "run", f"data.path=[{other}]", f"data.tokenizer={ensure_sample_corpus().tokenizer_dir}")
    assert_refused(proc, f"error: {other}.bin holds token id 5000, but the model's vocabulary (data.tokenizer's, or "
                         "model.vocab_size) has 4096 ids: the corpus was tokenized with another tokenizer")
    assert not (tmp_path / "run").exists()


def test_ids_past_the_vocabulary_after_the_start_up_check(tmp_path):
    """A file whose ids are in the vocabulary for the first 2**20 tokens that the start-up check
    reads, and past it after: each rank that reads such a sample stops with one line naming the
    file, itself and its host, exit code 2 (not an index error at the embedding)."""
    from megatron_sdmoe.data import ensure_sample_corpus

    mixed = str(tmp_path / "mixed")
    write_indexed(mixed, [[7] * 1023 + [0]] * 1024 + [[7, 5000] * 511 + [7, 0]] * 1024, 6000)
    proc = train(tmp_path / "run", f"data.path=[{mixed}]", f"data.tokenizer={ensure_sample_corpus().tokenizer_dir}",
                 world=2)
    errors = re.findall("error: .*", proc.stderr)  # the ranks' lines (rank 0's after its progress bar)
    pattern = (re.escape(f"error: {mixed}.bin holds token id 5000 (in sample ") + r"\d+\), past the model's 4096 "
               r"embedding rows: that file, or part of it, was tokenized with another tokenizer .*: preprocess it "
               r"with data.tokenizer's tokenizer, or leave it out of the blend" +
               re.escape(" [seen on rank ") + "[01]" + re.escape(f" of 2, host {socket.gethostname()}]"))
    assert proc.returncode == 2 and errors and all(re.fullmatch(pattern, e) for e in errors), proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "error: " not in line]
    assert all(line.startswith("train:") for line in noise), proc.stderr[-3000:]  # nothing else: no traceback
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
