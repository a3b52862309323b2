"""Run alone in a run directory with data.eod_mask_loss: restore its latest checkpoint through the
training setup; save the loss training takes on the first micro-batch (Trainer._loss), and the
tokens, labels and logits (the model called without labels) of that micro-batch and of each
validation micro-batch Trainer.evaluate reads, to the file named by the last argument."""
import sys

import torch

from megatron_sdmoe.data.datasets import get_batch
from megatron_sdmoe.runtime import shutdown
from tests.workers import training_session


def main() -> None:
    *args, out = sys.argv[1:]
    session = training_session(args)
    cfg = session.cfg
    assert session.layout.world_size == 1, "evaluate's micro-batches are one process's"
    trainer, model, device = session.trainer, session.engine.module, session.layout.device
    stage = trainer.stage_at(0)

    def read(dataset, micro: int) -> dict:
        batch = get_batch(dataset, trainer.micro_batch_indices(0, micro), trainer.vocab_rows)
        tokens, positions = batch["tokens"].to(device), batch["position_ids"].to(device)
        return {"tokens": batch["tokens"], "labels": batch["labels"], "logits": model(tokens, positions, None).cpu()}

    with torch.no_grad():
        train = {**read(stage.train, 0), "loss": trainer._loss(stage.train, 0, 0).cpu()}
        model.eval()  # as Trainer.evaluate runs the engine
        valid = [read(stage.valid, micro) for micro in range(cfg.train.eval_samples // cfg.train.micro_batch_size)]
    torch.save({"train": train, "valid": valid}, out)
    shutdown()


if __name__ == "__main__":
    main()
