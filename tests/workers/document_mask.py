"""Run alone in a run directory with data.document_mask: the first micro-batch's per-token losses as
training computes them (Trainer._forward on the real setup's engine), the same model's losses on
each packed document alone (its own tokens, labels and position ids, causal attention, no mask), and
the micro-batch's losses without a mask, saved with the sample's document starts to the file named
by the last argument."""
import sys

import torch

from megatron_sdmoe.data.datasets import get_batch
from megatron_sdmoe.runtime import shutdown
from tests.workers import training_session


def main() -> None:
    *args, out = sys.argv[1:]
    session = training_session(args)
    assert session.layout.world_size == 1, "the documents alone are one process's forward"
    trainer, model = session.trainer, session.engine.module
    train = trainer.stage_at(0).train
    batch = {k: v.to(session.layout.device) for k, v in get_batch(train, trainer.micro_batch_indices(0, 0)).items()}
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    with torch.no_grad():
        packed = trainer._forward(train, 0, 0)[0]
        unmasked = model(tokens, positions, None, labels=labels)
        alone = torch.full_like(packed, float("nan"))  # NaN: a position no document covers
        for row, starts in enumerate(batch["cu_seqlens"].tolist()):
            for start, end in zip(starts, starts[1:]):
                if end > start:  # cu_seqlens is padded with the sequence length
                    document = slice(start, end)
                    alone[row, document] = model(tokens[row:row + 1, document], positions[row:row + 1, document],
                                                 None, labels=labels[row:row + 1, document])[0]
    saved = {"packed": packed, "alone": alone, "unmasked": unmasked, "cu_seqlens": batch["cu_seqlens"],
             "position_ids": positions}
    torch.save({k: v.cpu() for k, v in saved.items()}, out)
    shutdown()


if __name__ == "__main__":
    main()
