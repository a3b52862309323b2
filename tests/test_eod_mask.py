"""data.eod_mask_loss in the losses training and evaluation take (training/loop.py), against a
reference: torch's cross_entropy on the model's logits, averaged over the positions whose input
token is not the tokenizer's EOD (docs/data.md, "EOD loss mask")."""
import random

import torch
import torch.nn.functional as F

from conftest import launch, metrics
from megatron_sdmoe.data import ensure_sample_corpus, load_tokenizer, sample_documents, write_indexed

TOL = 1e-5


def reference(part: dict, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's loss without the EOD positions, and its plain mean over every position."""
    ce = F.cross_entropy(part["logits"].flatten(0, 1).double(), part["labels"].flatten(), reduction="none")
    ce = ce.view_as(part["labels"])
    keep = (part["tokens"] != eod).double()
    return (ce * keep).sum() / keep.sum(), ce.mean()


def test_training_and_validation_losses_leave_out_the_eod_positions(tmp_path):
    tokenizer = ensure_sample_corpus().tokenizer_dir
    tok = load_tokenizer(tokenizer)
    # Documents of 3-12 tokens: each 64-token sample crosses several document boundaries.
    rng = random.Random(0)
    documents = ([*tok.tokenize(d)[:rng.randint(3, 12)], tok.eod] for d in sample_documents())
    write_indexed(str(tmp_path / "short"), documents, tok.vocab_size)
    overrides = [f"data.path=[{tmp_path / 'short'}]", f"data.tokenizer={tokenizer}", "data.eod_mask_loss=true",
                 "train.precision=fp32", "train.eval_interval=4"]
    run_dir = tmp_path / "run"
    # Four steps through the real entry point: a model whose losses differ from token to token.
    launch(run_dir, 1, *overrides)
    val_loss = metrics(run_dir)[-1]["val_loss"]
    launch(run_dir, 1, *overrides, str(tmp_path / "losses.pt"), module="tests.workers.eod_mask")
    got = torch.load(tmp_path / "losses.pt")

    for part in (got["train"], *got["valid"]):
        assert (part["tokens"] == tok.eod).sum(1).min() >= 3  # every sample holds several EODs
    masked, unmasked = reference(got["train"], tok.eod)
    assert abs(got["train"]["loss"].item() - masked.item()) < TOL
    assert abs(masked - unmasked) > 100 * TOL
    # val_loss: the mean of the micro-batches' masked means (Trainer.evaluate), at step 4's weights
    means = [reference(part, tok.eod) for part in got["valid"]]
    masked, unmasked = (torch.stack(m).mean().item() for m in zip(*means))
    assert abs(val_loss - masked) < TOL
    assert abs(masked - unmasked) > 100 * TOL
