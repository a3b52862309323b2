"""CPU compatibility layer: makes megatron-core 0.19.2 MoE run on a CPU-only machine over gloo.

megatron-core assumes CUDA in a handful of places. Each patch below replaces exactly one of them,
names the megatron-core site it covers, and is applied only when CUDA is absent (`apply()` is a
no-op on a GPU). `PATCHED_SITES` records the source hash of every patched site at the pinned
megatron-core version; tests/test_cpu_compat.py fails if any of them changes, so an upgrade is
forced to re-check each patch.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Site:
    module: str
    qualname: str
    sha256: str  # of the site's source text at megatron-core 0.19.2

    def source(self) -> str:
        """The site's source text, read from megatron-core's file (unaffected by patching)."""
        path = importlib.util.find_spec(self.module).origin
        text = Path(path).read_text()
        nodes = ast.parse(text).body
        for part in self.qualname.split("."):
            node = next(n for n in nodes if getattr(n, "name", None) == part)
            nodes = getattr(node, "body", [])
        return ast.get_source_segment(text, node)

    def current_sha256(self) -> str:
        return hashlib.sha256(self.source().encode()).hexdigest()


PATCHED_SITES = (
    # 1. add()/fork() read and write torch.cuda RNG states.
    Site("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker",
         "d30430fec1ac233dd802fccc4934af85931ed9641f7464df556e6b9b5ee07838"),
    # 2. The alltoall dispatcher makes a torch.cuda.Stream and copies split sizes on it.
    Site("megatron.core.transformer.moe.token_dispatcher",
         "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
         "4655a7033d8daf0cd2c696d6c2224af40c317597ee3f9172b39f2bec7197fd3a"),
    Site("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__",
         "1a6cfd809748a16cd90a0c8a312ca2eb6ea3e0b12e4f4700456ed4f7a4c1c723"),
    # 3. The causal mask is built with device="cuda" (used by the local attention's softmax).
    Site("megatron.core.transformer.utils", "get_default_causal_mask",
         "510d896df7d6deca0ddfb6c2868ec4b4c857f86c5fbc048a47f79d0effb83cb8"),
    # 4. The torch norm refuses sequence parallelism, which megatron-core requires for MoE + TP.
    Site("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__",
         "0b47766ef14b10d014340e7d81bb34dda7c76e5fa45df331082ed3440a1b355a"),
    # 5. Uneven all-gather / reduce-scatter (expert-tensor parallelism): gloo rejects uneven lists.
    Site("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
         "abaaf454b5e0914995deade91cf37ccc5d2178d8f7debdaa73ce925a5d4c82b6"),
    Site("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
         "09ac896729369d2d24a34ad36cdbb1d8841d21c21a9547a9536ce48d29d1a52f"),
    # 6. Activation recomputation (train.recompute) saves and restores the CUDA generator's state
    #    around each recomputed forward.
    Site("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
         "0c2b8f05b864739e095f2fecfb2172b04a94eacc773f4000a17dcc030cfe50b6"),
    Site("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
         "dea947ca0b7dc92be0bb70f6161b4d04bdcac7e3223e3be967bd05a40898d0de"),
)

_applied = False


def apply() -> None:
    """Patch megatron-core for CPU execution. Idempotent; does nothing when CUDA is present."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True
    # megatron's jit_fuser is torch.compile: compiling on CPU costs ~17 s on first call for no gain.
    import torch._dynamo as dynamo

    dynamo.config.disable = True
    # ~50 megatron-core call sites allocate on device=torch.cuda.current_device() (rotary embedding,
    # mappings, router, ...). Answering "cpu" makes all of them allocate on the host.
    torch.cuda.current_device = lambda: torch.device("cpu")

    _patch_rng_tracker()
    _patch_recompute_rng()
    _patch_alltoall_dispatcher()
    _patch_causal_mask()
    _patch_torch_norm()
    _patch_uneven_collectives()


def _patch_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The same named-state bookkeeping, on the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    # initialize_rng_tracker() instantiates the class by its module-level name.
    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker


def _patch_recompute_rng() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    # No CUDA generator to save: the CPU generator and the tracker's named states, which
    # recomputation saves as well (_get_all_rng_states), are the ones the CPU draws from.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


class _NoStream:
    """Stands in for the dispatcher's CUDA side stream: on CPU there is nothing to overlap."""

    def wait_stream(self, _other):
        pass


def _patch_alltoall_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher as td

    # __init__ creates the class-level stream only when it is None.
    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def dtoh_without_streams(self, point, tokens_per_expert=None):
        # Upstream turns the split sizes into numpy arrays at cuda_dtoh_point on a side stream;
        # the tensors are already on the host here, so only the conversion remains.
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for attr in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, attr)
                if torch.is_tensor(value):
                    setattr(self, attr, value.numpy())
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh_without_streams


def _patch_causal_mask() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask  # imported there by name


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    def new_norm(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="LayerNorm"):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        # Tag the weights like megatron's fused norms do: under sequence parallelism each TP rank
        # sees a slice of the sequence, so their grads are summed over TP (training/engine.py).
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new_norm


def _patch_uneven_collectives() -> None:
    import megatron.core.tensor_parallel.mappings as mappings

    upstream_gather = mappings._gather_along_first_dim
    upstream_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return upstream_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return upstream_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        full = input_.contiguous().clone()
        torch.distributed.all_reduce(full, group=group)
        return torch.split(full, [int(n) for n in input_split_sizes], dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter
