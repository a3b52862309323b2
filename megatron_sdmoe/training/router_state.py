"""What megatron-core does for MoE routers in its own training loop, which DeepSpeed's engine does
not run: the expert-bias update of auxiliary-loss-free balancing (megatron-core's
finalize_model_grads) and the per-step report of the routers' and MTP's auxiliary losses."""
from __future__ import annotations

import torch
from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias, reset_model_temporary_tensors
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper
from megatron.core.transformer.transformer_config import TransformerConfig

# megatron-core's tracker names -> metrics.jsonl keys
_AUX_LOSSES = {"load_balancing_loss": "aux_loss", "seq_load_balancing_loss": "aux_loss", "z_loss": "z_loss"}


def set_auxiliary_loss_scale(scale: float, device: torch.device) -> None:
    """The router and MTP losses are injected in backward; give them the LM loss's scale (1/GAS)."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=device))
    MTPLossAutoScaler.set_loss_scale(torch.tensor(scale, device=device))


@torch.no_grad()
def update_expert_bias(config: TransformerConfig, model: torch.nn.Module) -> None:
    """After a global batch: move each router's expert bias against its load (summed over TP x DP),
    then restart the count. A no-op without `moe.expert_bias_update_rate`."""
    if config.moe_router_enable_expert_bias:
        _update_router_expert_bias([model], config)
        reset_model_temporary_tensors(config, [model])


def report_auxiliary_losses(config: TransformerConfig, loss_scale: float, step: int) -> dict[str, float]:
    """This step's aux / z / MTP losses, averaged over micro-batches and MoE layers (collectives)."""
    totals: dict = {}
    get_moe_metrics_tracker().report(loss_scale=loss_scale, iteration=step, num_layers=config.num_layers,
                                     moe_layer_freq=config.moe_layer_freq, mtp_num_layers=config.mtp_num_layers,
                                     total_loss_dict=totals)
    result = {"aux_loss": 0.0}
    for name, value in totals.items():
        if name in _AUX_LOSSES:
            result[_AUX_LOSSES[name]] = result.get(_AUX_LOSSES[name], 0.0) + float(value)
    if config.mtp_num_layers:
        mtp: dict = {}
        MTPLossLoggingHelper.track_mtp_metrics(loss_scale, step, writer=None, total_loss_dict=mtp)
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        result["mtp_loss"] = sum(float(v) for v in mtp.values()) / config.mtp_num_layers
    return result
