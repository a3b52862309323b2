"""Resume at another data-parallel size: the ZeRO optimizer partitions re-cut, parameter by parameter.

Each rank file of a checkpoint holds that rank's ZeRO-1/2 partition: a flat slice of its
data-parallel group's fp32 master weights and Adam moments per parameter group, and DeepSpeed's map
of which parameter fragment lies where in it (`param_slice_mappings`). With the same TP / EP /
expert-TP layout a parameter is the same tensor as before on the ranks of its position; its state is
its fragments from the old group's partitions, joined in data-parallel order, and this rank keeps the
fragment its new partition holds. This is what DeepSpeed's universal-checkpoint loader does
(deepspeed/checkpoint/universal_checkpoint.py); it is written out here because that loader reads
whole tensors from DeepSpeed's own checkpoint tree, which these checkpoints do not use
(checkpoint.py says why).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; "step" is one count per group


def load_resharded_optimizer(optimizer, saved_places: list[dict], place: dict, load: Callable[[int], dict]) -> None:
    """Fill the ZeRO optimizer `optimizer` (DeepSpeed's stage 1/2 optimizer, or the BF16_Optimizer of
    bf16 ZeRO-1, before its first step) of the rank at `place` from a checkpoint saved with other
    data-parallel sizes. `saved_places`: the saved ranks' places (checkpoint.py: _places);
    `load(rank)`: a saved rank's file."""
    files: dict[int, dict] = {}  # memory-mapped: reading a fragment reads only it

    def saved_group(expert: bool) -> list[dict]:
        """The optimizer states of the saved ranks that partitioned this rank's dense or expert
        parameters (same position), in data-parallel order."""
        keys, order = (("ep", "etp"), "edp") if expert else (("tp",), "dp")
        ranks = sorted((r for r, p in enumerate(saved_places) if all(p[k] == place[k] for k in keys)),
                       key=lambda r: saved_places[r][order])
        for rank in ranks:
            if rank not in files:
                files[rank] = load(rank)
        return [files[rank]["optimizer"] for rank in ranks]

    bit16_groups = optimizer.bf16_groups if isinstance(optimizer, BF16_Optimizer) else optimizer.bit16_groups
    for index, (group, params) in enumerate(zip(optimizer.optimizer.param_groups, bit16_groups)):
        states = saved_group(bool(group.get("moe")))
        for param in params:
            if param._hp_mapping is None:  # no fragment of it in this rank's partition
                continue
            whole = _whole_state(optimizer.param_names[param], param.numel(), states)
            start, numel = param._hp_mapping.lp_fragment_address.start, param._hp_mapping.lp_fragment_address.numel
            param._hp_mapping.hp_fragment.data.copy_(whole["fp32"].narrow(0, start, numel))
            param._hp_mapping.optim_fragment = {key: whole[key].narrow(0, start, numel) for key in MOMENTS}
        flat = group["params"][0]
        # DeepSpeed's own step of its universal loader: the fragments into one flat state tensor per group
        map_to_flat_opt_states(flat, params, optimizer.optimizer.state, MOMENTS)
        optimizer.optimizer.state[flat]["step"] = states[0][BASE_OPTIMIZER_STATE]["state"][index]["step"]


def _whole_state(name: str, numel: int, states: list[dict]) -> dict[str, torch.Tensor]:
    """fp32 master weight and Adam moments of parameter `name`, flat, joined from its fragments in
    `states` (one saved ZeRO partition each, in data-parallel order)."""
    pieces: dict[str, list[torch.Tensor]] = {key: [] for key in ("fp32", *MOMENTS)}
    for state in states:
        for group, mapping in enumerate(state[PARAM_SLICE_MAPPINGS]):
            if name in mapping:
                start, count = mapping[name].start, mapping[name].numel
                pieces["fp32"].append(state[SINGLE_PARTITION_OF_FP32_GROUPS][group].narrow(0, start, count))
                moments = state[BASE_OPTIMIZER_STATE]["state"][group]
                for key in MOMENTS:
                    pieces[key].append(moments[key].narrow(0, start, count))
    whole = {key: torch.cat(parts) for key, parts in pieces.items() if parts}
    if any(t.numel() != numel for t in whole.values()) or len(whole) != len(pieces):
        raise RuntimeError(f"checkpoint: the saved partitions hold {whole['fp32'].numel() if whole else 0} of "
                           f"{name}'s {numel} elements")
    return whole
