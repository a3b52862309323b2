"""One training step through the real setup path (train.setup: the DeepSpeed ZeRO engine, then
Trainer.train_step). Saves, on rank 0, to the file named by the last argument: every weight before
the step and, after it, every weight with its Adam moments (DeepSpeed's fp32 state), full tensors
(stacked experts gathered over EP); the step's LR and gradient norm as the trainer reports them.

In one process it also saves the reference step, computed without the project's optimizer set-up:
the step's gradient by torch.autograd.grad on the model itself, then torch.nn.utils.clip_grad_norm_
and torch.optim.AdamW in float64, with groups built here from the config: weight decay on every
parameter but norm weights and biases, SD-MoE's common matrices at train.lr x common_lr_scale."""
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state
from megatron.core import parallel_state as ps

from megatron_sdmoe.config import Config
from megatron_sdmoe.moe.sdmoe import sdmoe_modules
from megatron_sdmoe.runtime import shutdown
from megatron_sdmoe.runtime.distributed import all_gathered, world_size_from_env
from megatron_sdmoe.train import Session
from megatron_sdmoe.training.engine import is_expert_param
from megatron_sdmoe.training.router_state import set_auxiliary_loss_scale
from tests.workers import training_session

MOMENTS = ("exp_avg", "exp_avg_sq")


def full(param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (the parameter or its state) with every expert: stacked experts gathered over EP."""
    group = ps.get_expert_model_parallel_group()
    if not is_expert_param(param) or dist.get_world_size(group) == 1:
        return tensor.detach().float().clone()
    return all_gathered(tensor.detach(), group).float()


def reference_gradients(session: Session) -> list[torch.Tensor]:
    """The step's gradient: each micro-batch's loss divided by their number, as the engine's backward
    divides it, differentiated by autograd on the model itself (the engine's forward would put
    DeepSpeed's backward hooks on the output)."""
    cfg, trainer, engine = session.cfg, session.trainer, session.engine
    params, micro_batches = list(engine.module.parameters()), cfg.train.global_batch_size // cfg.train.micro_batch_size
    set_auxiliary_loss_scale(1.0 / micro_batches, session.layout.device)  # as train_step does
    trainer.engine = engine.module
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    # more_micro_batches is off: SD-MoE routes each micro-batch's gradient on its own, where the
    # trainer routes their sum once (the same up to round-off: the routing is linear)
    for micro in range(micro_batches):
        loss = trainer._loss(trainer.stage_at(0).train, 0, micro) / micro_batches
        for total, grad in zip(grads, torch.autograd.grad(loss, params)):
            total += grad
    trainer.engine = engine
    return grads


def reference_step(cfg: Config, model: torch.nn.Module, grads: list[torch.Tensor]) -> dict:
    """Clipping and AdamW by torch on float64 copies of the weights (torch's fp32 norm on the CPU is
    off by up to 5e-5 for a 4096 x 64 gradient; DeepSpeed's is float64): the copies' weights and
    moments after the step, the gradient norm before clipping, and the groups' (lr, weight decay)."""
    tr = cfg.train
    common = {id(p) for layer in sdmoe_modules(model) for p in (layer.common_fc1, layer.common_fc2)}
    no_decay = {id(p) for module in model.modules() if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
                for p in module.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    copies, groups = {}, {}
    for (name, param), grad in zip(model.named_parameters(), grads):
        copy = copies[name] = torch.nn.Parameter(param.detach().double())
        copy.grad = grad
        lr = tr.lr * (cfg.sdmoe.common_lr_scale if id(param) in common else 1.0)
        groups.setdefault((lr, 0.0 if id(param) in no_decay else tr.weight_decay), []).append(copy)
    norm = torch.nn.utils.clip_grad_norm_(list(copies.values()), tr.grad_clip).item()
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in
                                   groups.items()], betas=tuple(tr.adam_betas), eps=tr.adam_eps)
    optimizer.step()
    state = {name: {"param": copy.detach(), **{k: optimizer.state[copy][k] for k in MOMENTS}}
             for name, copy in copies.items()}
    return {"reference": state, "reference_norm": norm, "groups": set(groups)}


def main() -> None:
    *args, out = sys.argv[1:]
    session = training_session(args)
    cfg = session.cfg
    assert cfg.train.warmup_steps == 0, "the reference steps at train.lr"
    model, optimizer = session.engine.module, session.engine.optimizer
    saved = {"before": {name: full(p, p) for name, p in model.named_parameters()}}
    if world_size_from_env() == 1:
        saved.update(reference_step(cfg, model, reference_gradients(session)))
    result = session.trainer.train_step(0)
    # DeepSpeed links the weights to their Adam moments after its first group's first step, when
    # only that group has moments: linked again, so that every group's can be read.
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
    saved.update(lr=result["lr"], grad_norm=result["grad_norm"], after={
        name: {"param": full(p, p), **{k: full(p, safe_get_full_optimizer_state(p, k)) for k in MOMENTS}}
        for name, p in model.named_parameters()})
    if dist.get_rank() == 0:
        torch.save(saved, out)
    shutdown()


if __name__ == "__main__":
    main()
