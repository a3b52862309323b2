"""`sdmoe-convert`: checkpoints to Hugging Face transformers models and back.

    sdmoe-convert to-hf RUN_OR_CHECKPOINT OUT_DIR
        a transformers model directory (config, sharded safetensors with an index, generation
        config, the run's tokenizer) from a checkpoint saved with any TP / EP / ETP / ZeRO layout;
        head-wise models carry their own modelling code (load with trust_remote_code=True)
    sdmoe-convert from-hf HF_DIR OUT_DIR [key=value ...]
        OUT_DIR/config.yaml (the model's settings, plus your overrides: layout, data, training)
        whose `model.init_from` names OUT_DIR/weights, the weights in this system's names, and
        OUT_DIR/tokenizer (when HF_DIR has one; else give data.tokenizer); `sdmoe-train
        OUT_DIR/config.yaml run.dir=RUN data.path=[CORPUS]` continues pretraining from them on a
        corpus tokenized with that tokenizer (run.dir and data.path given here or there;
        `moe.variant=sdmoe` splits the imported experts into common and unique parts);
        block-quantised FP8 checkpoints (DeepSeek-V3's release) are dequantised into the config's dtype
    sdmoe-convert upcycle HF_DIR OUT_DIR [moe.num_experts=8 moe.topk=2 ...]
        as from-hf, from a dense Qwen3ForCausalLM: sparse upcycling, each of the moe.num_experts
        routed experts a copy of its layer's MLP, the routers drawn fresh (upcycle.py); with
        moe.topk > 1 the MoE starts as the dense model's function

Tensors stream a group at a time (a tensor, or those that convert together: a layer's stacked
experts of one projection, Q/K/V), so peak memory is about twice the largest group. A dry run on
shapes alone first refuses any tensor the other side has no place for, and (from-hf) a config.json
whose sizes are not the weights'. Output is written to a
temporary directory and renamed into place; an existing OUT_DIR is refused.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_sdmoe.config import Config, is_headwise, load_config, save_config
from megatron_sdmoe.convert import deepseek, fp8, headwise_export, qwen, upcycle
from megatron_sdmoe.convert.checkpoint_reader import CheckpointReader
from megatron_sdmoe.convert.mapping import MTP_COPIES, conversion_group, layer_index
from megatron_sdmoe.convert.weights import ShardWriter, WeightDirectory
from megatron_sdmoe.errors import ArgumentParser, UserError, exit_bad_input, writing_into
from megatron_sdmoe.validation import validate

ADAPTERS = {"qwen3_moe": qwen, "qwen2_moe": qwen, "deepseek": deepseek}  # model.preset -> its adapter module
# a decoder or MTP layer (whose decoder layer's names are then those of any other)
OURS_LAYER = re.compile(r"((?:decoder|mtp)\.layers\.\d+)\.(?:mtp_model_layer\.)?(.+)")
HF_LAYER = re.compile(r"(model\.layers\.\d+)\.(.+)")


def adapter_for(preset: str):
    if preset not in ADAPTERS:
        raise UserError(f"model.preset={preset} has no Hugging Face conversion yet: convert a "
                        f"{' or '.join(ADAPTERS)} model")
    return ADAPTERS[preset]


def export_config(cfg: Config, vocab_size: int, dtype):
    """The exported model's transformers config: the family's class, or for head-wise routing
    this project's own modelling code (headwise_export.py)."""
    adapter = adapter_for(cfg.model.preset)
    if not is_headwise(cfg):
        adapter.check_routing(cfg)
    family = adapter.hf_config(cfg, vocab_size, dtype)
    return headwise_export.hf_config(cfg, family) if is_headwise(cfg) else family


def exported_names(adapter, names: list[str]) -> list[str]:
    """The checkpoint tensors an export holds: multi-token-prediction layers only where the class
    has a place for them (DeepSeek-V3's layout)."""
    return [name for name in names if adapter.EXPORTS_MTP or not name.startswith("mtp.")]


def imported_names(cfg: Config, names: list[str]) -> list[str]:
    """The transformers tensors an import converts: all but the MTP layers' copies of the embedding
    and output layer (mapping.MTP_COPIES)."""
    m = cfg.model

    def copy(name: str) -> bool:
        match = HF_LAYER.fullmatch(name)
        return bool(match) and match.group(2) in MTP_COPIES and \
            m.num_layers <= layer_index(match.group(1)) < m.num_layers + m.mtp_layers

    return [name for name in names if not copy(name)]


def write_config(cfg: Config, hf_config, out: Path) -> None:
    """config.json, and for head-wise routing the modelling code it names."""
    hf_config.save_pretrained(out)
    if is_headwise(cfg):
        shutil.copy(headwise_export.MODELING, out)


def conversion_groups(names: list[str], layer: re.Pattern) -> list[tuple[str, dict[str, str]]]:
    """[(layer prefix or lone name, {name within the layer: full name})], one per tensor group that
    converts together (mapping.conversion_group), so memory holds one group at a time."""
    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for name in names:
        match = layer.match(name)
        if match:
            groups[match.group(1), conversion_group(match.group(2))][match.group(2)] = name
        else:
            groups[name, name][name] = name
    return [(prefix, members) for (prefix, _), members in groups.items()]


class LazyTensors(Mapping):
    """A conversion group's tensors, each read when the adapter asks for it (`used`: those it did)."""

    def __init__(self, names: dict[str, str], read):
        self.names, self.read, self.used = names, read, set()

    def __getitem__(self, key: str):
        if key not in self.names:  # the model the config describes needs more than the files hold
            raise UserError(f"the converted files lack {key} (or the layer's other tensors of its kind): convert "
                            "with the model's own sizes, without overriding them")
        self.used.add(key)
        return self.read(self.names[key])

    def __contains__(self, key) -> bool:  # without reading (Mapping's own would read the tensor)
        return key in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextmanager
def staged(out: Path):
    """Write into a temporary sibling of `out`, renamed to `out` on success, removed otherwise."""
    if out.exists():
        raise UserError(f"{out} exists: choose a new output directory (nothing is overwritten)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_into(out, "OUT_DIR"):
        tmp.mkdir(parents=True)
    try:
        yield tmp
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(groups: list[tuple[str, dict[str, str]]], read, transform, writer: ShardWriter, what: str) -> None:
    for prefix, names in tqdm(groups, desc=what, unit="group"):
        writer.add(transform(prefix, LazyTensors(names, read)))
    writer.close()


def check_sizes(cfg: Config, source, hf_dir: str) -> None:
    """Refuse a config.json with another number of layers, another vocabulary or another query
    projection than the weights hold: layers past the weights' would be drawn fresh, the weights'
    past the config's taken for MTP layers, a query latent left out or drawn fresh, and a vocabulary
    of another size refused only when training starts."""
    names, m = source.names(), cfg.model
    config = Path(hf_dir) / "config.json"
    held = sorted({layer_index(match.group(1)) for match in map(HF_LAYER.match, names) if match})
    if held != list(range(m.num_layers + m.mtp_layers)):
        mtp = f" and {m.mtp_layers} MTP" * bool(m.mtp_layers)
        raise UserError(f"{config} describes {m.num_layers} layers{mtp}, but the weights hold {len(held)} (numbered "
                        f"{held[0] if held else '-'} to {held[-1] if held else '-'}): restore the model's own config.json")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = source.placeholder(name).shape[0] if name in names else m.vocab_size
        if rows != m.vocab_size:
            raise UserError(f"{config} has vocab_size={m.vocab_size}, but {name} holds {rows} rows: restore the "
                            "model's own config.json")
    latent = any(".q_a_proj." in name for name in names)
    if m.attention == "mla" and latent != bool(m.mla.q_lora_rank):
        raise UserError(f"{config} has q_lora_rank={m.mla.q_lora_rank}, but the weights hold {'a' if latent else 'no'} "
                        "query latent (q_a_proj): restore the model's own config.json")


def check_shapes(hf, source, hf_dir: str) -> None:
    """Refuse a config.json whose sizes are not those of the weights beside it (e.g. another expert
    width, which no reshape would notice): transformers' own model of it, built on the meta device
    (nothing allocated), against the weights, tensor by tensor, a layer's experts together (on disk
    one tensor per expert, in the model fused). Tensors on one side only (MTP layers, routers an
    upcycling draws fresh) are the other checks' business."""
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from megatron_sdmoe.convert import headwise_modeling

    def key(name: str) -> str:
        layer, experts, _ = name.partition(".experts.")
        return f"{layer}.experts" if experts else name

    own = headwise_export.config_class(hf.model_type)  # a head-wise export: this package's class
    with torch.device("meta"):
        model = (getattr(headwise_modeling, hf.architectures[0])(hf) if own
                 else AutoModelForCausalLM.from_config(hf))
    described, held = Counter(), Counter()
    for name, tensor in model.state_dict().items():
        described[key(name)] += tensor.numel()
    for name in source.names():
        held[key(name)] += source.placeholder(name).numel()
    for name in described:  # the model's order: the first layer that differs is named
        if name in held and described[name] != held[name]:
            raise UserError(f"{Path(hf_dir) / 'config.json'} gives {name} {described[name]:,} parameters, but the "
                            f"weights beside it hold {held[name]:,}: restore the model's own config.json")


def refuse_unused(groups: list[tuple[str, dict[str, str]]], placeholder, transform) -> None:
    """A dry run on data-less tensors: a tensor the adapter does not use (one the other side has
    no place for) is refused before anything is written, never dropped."""
    for prefix, names in groups:
        tensors = LazyTensors(names, placeholder)
        transform(prefix, tensors)
        unused = sorted(set(names) - tensors.used)
        if unused:
            raise UserError(f"{names[unused[0]]} has no counterpart in the converted model (a quantised "
                            "checkpoint, a feature the target class lacks?): convert a model without it")


def to_hf(checkpoint: str, out: Path) -> None:
    from transformers import GenerationConfig

    from megatron_sdmoe.data.sample_corpus import configured_tokenizer

    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    adapter = adapter_for(cfg.model.preset)
    embedding = reader.tensor("embedding.word_embeddings.weight")
    hf_config = export_config(cfg, embedding.shape[0], embedding.dtype)
    tokenizer = configured_tokenizer(cfg.data.tokenizer)
    groups = conversion_groups(exported_names(adapter, reader.names()), OURS_LAYER)

    def transform(group, tensors):
        return adapter.to_hf(cfg, group, tensors)

    refuse_unused(groups, reader.placeholder, transform)
    with staged(out) as tmp:
        convert(groups, reader.tensor, transform, ShardWriter(tmp), "to-hf")
        write_config(cfg, hf_config, tmp)
        GenerationConfig(eos_token_id=tokenizer.eod).save_pretrained(tmp)
        tokenizer.hf.save_pretrained(tmp)
    note = "; load it with trust_remote_code=True (its modelling code is the export's own)" if is_headwise(cfg) else ""
    print(f"wrote {out} ({hf_config.architectures[0]}, step {reader.meta['step']} of {reader.dir}{note})")
    if cfg.moe.capacity_factor is not None:  # transformers' classes have no expert capacity
        print(f"note: trained with moe.capacity_factor={cfg.moe.capacity_factor:g}, which drops tokens over an "
              "expert's capacity; the export routes every token (as training with moe.capacity_factor=null)")


def read_hf_config(hf_dir: str):
    """transformers' config of `hf_dir`; a head-wise export's through this package's own class."""
    from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
    from transformers import AutoConfig

    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("config.json holds no mapping of settings")
        model_type = config.get("model_type")
        own = headwise_export.config_class(model_type)
        return own.from_pretrained(hf_dir) if own else AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{hf_dir} holds no readable Hugging Face config ({str(e).splitlines()[0]}): give a model "
                        "directory with config.json")
    except (StrictDataclassFieldValidationError, StrictDataclassClassValidationError) as e:  # a mistyped setting
        raise UserError(f"{Path(hf_dir) / 'config.json'}: {' '.join(str(e).split())}: restore the model's own "
                        "config.json") from None


def import_config(hf, overrides: list[str], names: list[str]):
    """(the family's adapter, this system's validated config) for a transformers config, the
    names of its weights and overrides."""
    architectures = {arch: adapter for adapter in set(ADAPTERS.values()) for arch in adapter.ARCHITECTURES.values()}
    adapter = architectures.get(headwise_export.family_architecture((hf.architectures or [None])[0]))
    if adapter is None:
        dense = (f"; a dense {upcycle.DENSE_ARCHITECTURE} becomes an MoE with sdmoe-convert upcycle"
                 if hf.architectures == [upcycle.DENSE_ARCHITECTURE] else "")
        raise UserError(f"architectures={hf.architectures} cannot be imported: this system imports "
                        f"{', '.join(sorted(architectures))} and their head-wise exports{dense}")
    headwise = getattr(hf, "headwise", None) is not None
    imported = [*adapter.config_overrides(hf, names), *(headwise_export.config_overrides(hf) if headwise else [])]
    cfg, own = load_config(None, [*imported, *overrides]), load_config(None, imported)
    shaping = WEIGHT_SHAPES + (HEADWISE_SHAPES if is_headwise(own) else [])
    changed = [f"{key}: {_setting(own, key)} -> {_setting(cfg, key)}" for key in shaping
               if _setting(cfg, key) != _setting(own, key)]
    if is_headwise(cfg) != is_headwise(own):  # head slices and per-head banks: other weights
        changed.append(f"moe.variant: {own.moe.variant} -> {cfg.moe.variant}")
    if changed:
        raise UserError(f"overrides would describe another model than the weights ({', '.join(changed)}): drop them "
                        "(the model's sizes come from its config.json)")
    par, rows = cfg.parallel, hf.vocab_size
    if own.model.make_vocab_size_divisible_by % par.tensor:
        raise UserError(f"the model's vocabulary of {rows} rows cannot be split over parallel.tensor={par.tensor}, "
                        "and rows added to it would change its softmax: import at a parallel.tensor that divides "
                        f"{own.model.make_vocab_size_divisible_by}")
    validate(cfg, max(par.tensor, par.expert * par.expert_tensor))
    return adapter, cfg


# The settings that shape the weights (or add some): taken from the transformers config, never overridden.
WEIGHT_SHAPES = ["model.preset", "model.num_layers", "model.hidden_size", "model.num_attention_heads",
                 "model.num_query_groups", "model.kv_channels", "model.attention", "model.dense_layers",
                 "model.dense_ffn_hidden_size", "model.mtp_layers", "model.vocab_size",
                 "model.make_vocab_size_divisible_by", "model.mla.q_lora_rank",
                 "model.mla.kv_lora_rank", "model.mla.qk_head_dim", "model.mla.qk_rope_head_dim",
                 "model.mla.v_head_dim", "moe.num_experts", "moe.ffn_hidden_size", "moe.shared_expert_ffn_hidden_size"]
HEADWISE_SHAPES = ["headwise.heads", "headwise.experts_per_head", "headwise.ffn_hidden_size", "headwise.bank"]


def _setting(cfg: Config, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def _unquantised_dtype(hf) -> torch.dtype:
    """The dtype a quantised model computes in (its config's), bf16 if it names none."""
    dtype = getattr(hf, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize > 1 \
        else torch.bfloat16


def from_hf(hf_dir: str, out: Path, overrides: list[str], upcycled: bool = False) -> None:
    """`upcycled`: the dense model in `hf_dir` upcycled (upcycle.py) into the MoE that the overrides'
    moe.num_experts and moe.topk (by default the config's defaults) describe."""
    from megatron_sdmoe.data import load_tokenizer

    out = out.resolve()
    has_tokenizer = (Path(hf_dir) / "tokenizer_config.json").is_file()  # else data.tokenizer as overridden
    hf = read_hf_config(hf_dir)
    source, block, dequantised = WeightDirectory(hf_dir), fp8.block_size(hf), []
    if block:  # FP8 weights with block scales (DeepSeek-V3's release): written in the model's dtype
        source = fp8.DequantizedWeights(source, block, _unquantised_dtype(hf))
        dequantised = [f"FP8 dequantised to {source.dtype}"]
    if upcycled:
        dense = hf.architectures[0]
        hf = upcycle.moe_config(hf, load_config(None, overrides).moe)
        source = upcycle.UpcycledWeights(source, hf)
    adapter, cfg = import_config(hf, [f"model.init_from={out / 'weights'}",
                                      *[f"data.tokenizer={out / 'tokenizer'}"] * has_tokenizer, *overrides],
                                 source.names())
    check_sizes(cfg, source, hf_dir)
    if not has_tokenizer and cfg.data.tokenizer is None:  # training would read the built-in corpus's
        raise UserError(f"{hf_dir} holds no tokenizer (tokenizer_config.json), and the built-in corpus's ids mean "
                        f"other tokens: copy the model's tokenizer files into {hf_dir}, or pass data.tokenizer=DIR "
                        "(the tokenizer your corpus is tokenized with)")
    groups = conversion_groups(imported_names(cfg, source.names()), HF_LAYER)

    def transform(group, tensors):
        try:
            return adapter.from_hf(cfg, group, tensors)
        except RuntimeError as e:  # a reshape to the sizes config.json gives, of weights of other sizes
            raise UserError(f"{Path(hf_dir) / 'config.json'} does not describe the weights beside it ({group}: "
                            f"{str(e).splitlines()[0]}): restore the model's own config.json") from None

    refuse_unused(groups, source.placeholder, transform)
    check_shapes(hf, source, hf_dir)
    with staged(out) as tmp:
        (tmp / "weights").mkdir()
        convert(groups, source.tensor, transform, ShardWriter(tmp / "weights"), "from-hf")
        if has_tokenizer:
            load_tokenizer(hf_dir).hf.save_pretrained(tmp / "tokenizer")
        save_config(cfg, tmp / "config.yaml")
    m = cfg.model
    read = [f"{dense} upcycled: {cfg.moe.num_experts} experts, top-{cfg.moe.topk}" if upcycled
            else hf.architectures[0], f"{m.num_layers} layers"] + [f"{m.mtp_layers} MTP"] * bool(m.mtp_layers) + \
        ["YaRN"] * (m.rope_scaling == "yarn") + dequantised
    # a tokenizer of its own needs a corpus tokenized with it (the built-in corpus has its own)
    data = "" if cfg.data.path or cfg.data.stages or not has_tokenizer else " data.path=[CORPUS]"
    print(f"wrote {out} ({', '.join(read)}): continue pretraining with sdmoe-train {out / 'config.yaml'} "
          f"run.dir=...{data}" + (f" (CORPUS: .bin/.idx prefixes tokenized with {out / 'tokenizer'}, "
                                  "sdmoe-preprocess)" if data else ""))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sdmoe-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-hf", help="checkpoint -> Hugging Face model directory")
    export.add_argument("checkpoint", help="run directory (its latest checkpoint) or checkpoints/step_* directory")
    export.add_argument("out", type=Path)
    imports = commands.add_parser("from-hf", help="Hugging Face model directory -> weights to train from")
    imports.add_argument("hf_dir")
    imports.add_argument("out", type=Path)
    imports.add_argument("overrides", nargs="*", metavar="key=value")
    upcycling = commands.add_parser("upcycle", help="dense Hugging Face Qwen3 model -> MoE weights to train from, "
                                    "each expert a copy of its layer's MLP (moe.num_experts, moe.topk: the MoE)")
    upcycling.add_argument("hf_dir")
    upcycling.add_argument("out", type=Path)
    upcycling.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            to_hf(args.checkpoint, args.out)
        else:
            from_hf(args.hf_dir, args.out, args.overrides, upcycled=args.command == "upcycle")
    except UserError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
