"""The released models' own formats, against transformers: a checkpoint laid out as DeepSeek-V3's
release (block-quantised FP8, a multi-token-prediction layer after the decoder layers) imports as
the model transformers dequantises from it; the released Qwen3-30B-A3B, DeepSeek-V2-Lite and
DeepSeek-V3 config.json files import as this system's configs that imitate them."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, sample_tokenizer
from test_convert import VOCAB, convert, export

from megatron_sdmoe.config import load_config


def quantise_fp8(tensors: dict, block: int) -> dict:
    """DeepSeek-V3's release format: every linear weight of the layers (not the routers) as
    float8_e4m3fn, with a float32 `_scale_inv` per block x block (the block's largest magnitude
    maps to e4m3's largest, 448)."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            rows, cols = tensor.shape
            blocks = tensor.reshape(rows // block, block, cols // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            out[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            out[name + "_scale_inv"] = scale.float()
        else:
            out[name] = tensor
    return out


def save_fp8(tensors: dict, config_dir, out_dir) -> None:
    """`tensors` quantised in 8 x 8 blocks into `out_dir`, with config_dir's config.json saying so."""
    out_dir.mkdir()
    save_file(quantise_fp8(tensors, 8), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((config_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [8, 8]}
    (out_dir / "config.json").write_text(json.dumps(config))


def test_fp8_checkpoint_imports_dequantised(single_process_groups, tmp_path):
    """A checkpoint laid out as DeepSeek-V3's release (block-quantised FP8, a multi-token-prediction
    layer after the decoder layers with its copies of the embedding and output layer) imports with
    from-hf as the model transformers dequantises from it: the same logits; the MTP layer comes too."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.models import build_model
    from megatron_sdmoe.runtime import seed_everything

    cfg = load_config(REPO / "configs" / "tiny-deepseek.yaml")  # MLA, shared experts, one MTP layer
    seed_everything(cfg.train.seed)
    export(cfg, build_model(cfg, VOCAB, torch.float32), tmp_path / "hf")  # config.json: dtype float32
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    mtp = f"model.layers.{cfg.model.num_layers}"
    tensors.update({f"{mtp}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                    f"{mtp}.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_fp8(tensors, tmp_path / "hf", tmp_path / "fp8")

    proc = convert("from-hf", tmp_path / "fp8", tmp_path / "imported", sample_tokenizer())
    assert "(DeepseekV3ForCausalLM, 4 layers, 1 MTP, FP8 dequantised to torch.float32)" in proc.stdout, proc.stdout
    imported = load_config(tmp_path / "imported" / "config.yaml")
    assert imported.model.mtp_layers == 1
    ours = build_model(imported, VOCAB, torch.float32).eval()  # weights from model.init_from, MTP included
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = ours(tokens, torch.arange(48).expand_as(tokens), None) - theirs(tokens).logits
    assert difference.abs().max().item() <= 1e-4


def test_fp8_blocks_at_the_edge_are_partial():
    """Scales for a weight that is not a whole number of blocks (DeepSeek-V3's 576-row key/value
    projection in 128-row blocks): the last blocks are cut, as transformers' dequantisation of the
    zero-padded weight gives; scales of another shape are refused."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from megatron_sdmoe.convert.fp8 import dequantize
    from megatron_sdmoe.errors import UserError

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 12, generator=generator).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=generator)
    padded = torch.zeros(24, 16, dtype=torch.float8_e4m3fn)
    padded[:20, :12] = weight
    reference = Fp8Dequantize(None)._dequantize_one(padded, scale, output_dtype=torch.float32)[:20, :12]
    assert torch.equal(dequantize(weight, scale, (8, 8), torch.float32), reference)
    with pytest.raises(UserError, match=r"scales of shape \[3, 1\], not one per 8 x 8 block"):
        dequantize(weight, scale[:, :1], (8, 8), torch.float32)


# The model-defining fields of the released config.json files on the Hugging Face hub
# (Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V2-Lite, deepseek-ai/DeepSeek-V3), in their original
# spelling (`rope_scaling` with `type`, the fields of DeepSeek's own modelling code that
# transformers ignores)
RELEASED = {
    "qwen3-30b-a3b.yaml": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936},
    "deepseek-v2-lite.yaml": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "v_head_dim": 128, "vocab_size": 102400},
    "deepseek-v3.yaml": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "v_head_dim": 128, "vocab_size": 129280}}


@pytest.mark.parametrize("config", RELEASED)
def test_released_configs_import_as_the_real_scale_configs(config, tmp_path):
    """The released Qwen3-30B-A3B, DeepSeek-V2-Lite and DeepSeek-V3 configs (V3's weights: FP8 and
    an MTP layer 61) import as the architecture of this system's configs that imitate them, the
    DeepSeek ones with their YaRN."""
    from test_config import config_keys

    from megatron_sdmoe.convert.cli import import_config, read_hf_config
    from megatron_sdmoe.convert.fp8 import block_size
    from megatron_sdmoe.models.common import score_function

    (tmp_path / "config.json").write_text(json.dumps(RELEASED[config]))
    hf = read_hf_config(tmp_path)
    names = [f"model.layers.{i}.input_layernorm.weight" for i in range(hf.num_hidden_layers)]
    if hf.model_type == "deepseek_v3":  # V3's weights hold its MTP layer, with the projection that makes it one
        names += [f"model.layers.{hf.num_hidden_layers}.{name}.weight" for name in ("input_layernorm", "eh_proj")]
    _, imported = import_config(hf, [], names)
    ours = load_config(REPO / "configs" / config)
    defining = [key for key in config_keys(type(ours)) if key.split(".")[0] == "model" and key not in (
        "model.max_position_embeddings", "model.rope_scaling", "model.mtp_loss_coeff", "model.init_from",
        "model.make_vocab_size_divisible_by") and not key.startswith("model.yarn.")]
    defining += ["moe.num_experts", "moe.topk", "moe.ffn_hidden_size", "moe.shared_expert_ffn_hidden_size",
                 "moe.num_groups", "moe.group_topk", "moe.routed_scaling_factor"]
    if ours.model.dense_layers == 0:  # the width of dense layers there are none of
        defining.remove("model.dense_ffn_hidden_size")

    def value(cfg, key):
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return cfg

    assert {key: value(imported, key) for key in defining} == {key: value(ours, key) for key in defining}
    assert score_function(imported) == score_function(ours)
    yarn = RELEASED[config]["rope_scaling"]
    assert imported.model.rope_scaling == ("yarn" if yarn else "none")
    if yarn:
        y = imported.model.yarn
        assert (y.factor, y.original_max_position_embeddings, y.mscale, y.mscale_all_dim) == (
            40, 4096, yarn["mscale"], yarn["mscale"])
    assert (imported.moe.expert_bias_update_rate > 0) == (config == "deepseek-v3.yaml")
    released = RELEASED[config]
    assert imported.moe.aux_loss_coeff == released.get("aux_loss_alpha", released.get("router_aux_loss_coef"))
    assert imported.moe.aux_loss_type == ("sequence" if released.get("seq_aux") else "batch")
    assert block_size(hf) == ((128, 128) if config == "deepseek-v3.yaml" else None)
