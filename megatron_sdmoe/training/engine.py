"""DeepSpeed ZeRO engine around a megatron-core MoE model.

DeepSpeed knows nothing of megatron-core's parallel groups, so this module introduces them:
- dense parameters are reduced over megatron-core's data-parallel group (via the `mpu` adapter);
- expert parameters (megatron-core marks them `allreduce=False`) form DeepSpeed MoE parameter
  groups whose reduction group is megatron-core's expert-data-parallel group;
- norm and router weights under sequence parallelism get their grads summed over TP (megatron-core
  does this in its own finalize_model_grads, which DeepSpeed does not call).
ZeRO then reduces dense grads over DP and expert grads over expert-DP, both divided by the dense DP
size, which is exactly the mean over the global batch.
"""
from __future__ import annotations

import contextlib
import io

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from megatron.core import parallel_state as ps

from megatron_sdmoe.config import Config, routed_experts
from megatron_sdmoe.runtime import Layout
from megatron_sdmoe.training.schedule import lr_schedule


class MegatronMPU:
    """DeepSpeed's `mpu` protocol answered from megatron-core's parallel state."""

    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1


class ExpertGroupMarker(DeepSpeedMoE):
    """Parameter-free submodule that makes DeepSpeed treat the model as MoE.

    The engine enables expert-aware ZeRO reduction only if it finds a deepspeed.moe.layer.MoE
    submodule (engine.py: has_moe_layers); megatron-core's MoELayer is not one. MoE.__init__ is
    skipped on purpose: the experts live in megatron-core's layers.
    """

    def __init__(self, num_experts: int, group_name: str, ep_size: int):
        torch.nn.Module.__init__(self)
        self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
        pass  # the groups are megatron-core's, registered by register_expert_groups()

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertGroupMarker is a marker and is never called")


def expert_group_name(cfg: Config) -> str:
    return f"ep_size_{cfg.parallel.expert}"


def register_expert_groups(name: str) -> None:
    """Point DeepSpeed's expert groups at megatron-core's, so both reduce over the same ranks."""
    ep, edp = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp)


def is_expert_param(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def reduce_sequence_parallel_grads_over_tp(model: torch.nn.Module) -> None:
    """Sum grads of sequence-parallel weights over TP as they are produced (before ZeRO's hooks)."""
    group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(all_reduce)


def optimizer_param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """No weight decay on 1-D parameters (norm weights, biases); SD-MoE common matrices at their
    own LR; expert parameters split into DeepSpeed MoE groups."""
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        lr_scale = cfg.sdmoe.common_lr_scale if name.endswith(("common_fc1", "common_fc2")) else 1.0
        groups.setdefault((param.dim() > 1, lr_scale), []).append(param)
    split = split_params_into_different_moe_groups_for_optimizer([
        {"name": f"{'decay' if decay else 'no_decay'}_lr{scale:g}", "params": params,
         "weight_decay": cfg.train.weight_decay if decay else 0.0, "lr": cfg.train.lr * scale}
        for (decay, scale), params in groups.items()])
    # A group of expert parameters only (per-expert common matrices) leaves an empty dense group
    # behind, which deepspeed.initialize drops after the LR schedule has taken one LR per group.
    return [group for group in split if group["params"]]


def build_engine(model: torch.nn.Module, cfg: Config, layout: Layout, grad_accumulation_steps: int,
                 dtype: torch.dtype):
    """Wrap `model` in a DeepSpeed ZeRO-1/2 engine with AdamW and the configured LR schedule."""
    # Experts use their own groups only when EP > 1 or ETP != TP; otherwise megatron-core treats
    # them as dense parameters, and so does DeepSpeed (it refuses MoE mode without expert params).
    expert_params = [p for p in model.parameters() if is_expert_param(p)]
    if expert_params:
        group = expert_group_name(cfg)
        register_expert_groups(group)
        for param in expert_params:
            param.group_name = group
        model.expert_group_marker = ExpertGroupMarker(routed_experts(cfg), group, cfg.parallel.expert)
    reduce_sequence_parallel_grads_over_tp(model)

    tr = cfg.train
    # A torch optimizer: DeepSpeed's fused Adam needs a compiled op that the CPU build lacks. On GPUs
    # torch's fused kernel: the default (foreach) allocates temporaries the size of a whole parameter
    # group (12.5 GiB for configs/qwen3-moe-1gpu.yaml's fp32 masters, past what its estimate leaves)
    # and makes more passes over memory. CPU runs keep the default: fused rounds differently (by
    # ~1e-7), and the CPU results in the docs were measured with foreach.
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=tr.lr, betas=tuple(tr.adam_betas),
                                  eps=tr.adam_eps, fused=torch.cuda.is_available())
    scheduler = lr_schedule(optimizer, cfg)
    # Whether gradients are summed over replicas (dense or expert data parallelism) or, under ZeRO-1,
    # pass through the engine's all-reduce, which casts them to the communication type even alone
    reduced = (cfg.parallel.zero_stage == 1 or layout.data_parallel > 1
               or layout.world_size > layout.expert * layout.expert_tensor)
    ds_config = {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Gradients add up over a step's micro-batches, and over data-parallel ranks, in fp32 (as
        # Megatron-LM's main grads do): DeepSpeed's default under bf16 is a bf16 sum, which rounds
        # every addition to 8 bits of mantissa. Under ZeRO-1 this makes DeepSpeed use its
        # BF16_Optimizer, under ZeRO-2 its ZeRO optimizer with an fp32 gradient partition. ZeRO-2
        # with no replica adds each bf16 gradient to that partition as exactly as its fp32 cast:
        # the casts to fp32 and back would only cost memory traffic (tests/test_bf16.py).
        "data_types": {"grad_accum_dtype": "fp32"},
        **({"communication_data_type": "fp32"} if reduced else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op that only its inference
        # path uses; compiling it costs ~30 s per fresh machine and it crashed concurrent runs here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with contextlib.redirect_stdout(io.StringIO()):  # BF16_Optimizer prints memory usage as it is built
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, mpu=MegatronMPU())
    return engine
