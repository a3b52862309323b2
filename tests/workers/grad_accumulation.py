"""One global batch's gradient, accumulated over its micro-batches by the DeepSpeed engine of the
real setup, against the same micro-batches' gradients (torch.autograd.grad on the model itself)
summed in fp32. Prints `ACCUMULATION {json}` on rank 0: the largest relative difference over the
parameters, and the number of micro-batches."""
import json
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from megatron_sdmoe.config import grad_accumulation_steps
from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.training.router_state import set_auxiliary_loss_scale
from tests.workers import training_session


def main() -> None:
    session = training_session(sys.argv[1:])
    cfg = session.cfg
    assert session.layout.world_size == 1, "the reference is one process's gradient"
    trainer, engine = session.trainer, session.engine
    micro_batches, train = grad_accumulation_steps(cfg, 1), trainer.stage_at(0).train
    set_auxiliary_loss_scale(1.0 / micro_batches, session.layout.device)  # as train_step does
    params = [p for p in engine.module.parameters() if p.requires_grad]

    for micro in range(micro_batches):
        engine.backward(trainer._loss(train, 0, micro))
        if micro < micro_batches - 1:
            engine.step()  # not yet a step: only the last micro-batch's is
    accumulated = [safe_get_full_grad(p).float().clone() for p in params]

    # The reference calls the model itself: the engine's forward puts DeepSpeed's backward hooks
    # (its loss scaling among them) on the output.
    trainer.engine = engine.module
    reference = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # the weights have not moved
    for micro in range(micro_batches):  # DeepSpeed's backward divides the loss by the micro-batches
        grads = torch.autograd.grad(trainer._loss(train, 0, micro) / micro_batches, params, allow_unused=True)
        for total, grad in zip(reference, grads):
            if grad is not None:
                total += grad.float()
    error = max(((got - want).norm() / want.norm()).item() for got, want in zip(accumulated, reference)
                if want.norm() > 0)
    print("ACCUMULATION " + json.dumps({"max_relative_error": error, "micro_batches": micro_batches,
                                        "dtype": str(params[0].dtype)}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
