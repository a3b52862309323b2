"""SD-MoE: spectral-decoupled experts (docs/methods.md section 1, arXiv 2602.12556).

Every routed-expert projection (gate, up, down) of a layer has a common matrix C and a unique
matrix U_e per expert; the forward pass uses W_e = C + U_e. The gradient G_e of W_e is routed:
U_e gets the two-sided complement (I - P) G_e (I - R) of the common basis (P = QQ^T, R = VV^T, the
top-k singular vectors of C), C gets the rest, summed over experts. Q, V are refreshed every T
steps by a randomized SVD of C, identically on every rank.

`common: shared` (default) keeps one C per group of experts and projection, a dense parameter
replicated on every expert-parallel rank: the group is the layer's experts, or under head-wise
routing one head's bank; `per_expert` gives each expert its own C_e and basis (an expert parameter).
Either way the experts a common matrix serves are consecutive, `group_size` of them per group.

Under expert tensor parallelism (ETP > 1) C is sharded like U (gate/up by rows, down by columns);
the basis vectors of the sharded side are sharded the same way, and the gradient routing sums its
one small cross-shard product over the expert-TP group. Bases are computed from C gathered whole,
so every layout computes the same basis. A projection left out of `sdmoe.projections` keeps C = 0
and a zero basis (its whole gradient goes to U), and rank 0 an empty basis: a layer with no
projection decoupled is exactly the baseline MoE.
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdmoe.config import SDMoEConfig
from megatron_sdmoe.moe.experts import GroupedExperts, by_projection
from megatron_sdmoe.runtime.distributed import all_gathered

PROJECTIONS = ("gate", "up", "down")
# Where each projection lives: its stacked weight and row block in it (fc1 = [gate; up], fc2 = down).
BLOCK = {"gate": ("fc1", 0), "up": ("fc1", 1), "down": ("fc2", 0)}
# Which side of each projection's matrix [m, n] expert tensor parallelism splits: fc1 = [gate; up]
# by rows, fc2 (down) by columns (megatron-core's column- and row-parallel expert linears).
SHARDED_SIDE = {"gate": "rows", "up": "rows", "down": "cols"}


class Shards:
    """An expert-TP group and the side of a matrix split over it (None: not sharded)."""

    def __init__(self, group, side: str | None):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.side = side if self.group is not None else None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the shards (the tensor itself when unsharded)."""
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def squared_norms(self, matrices: torch.Tensor) -> torch.Tensor:
        """Squared Frobenius norm of each whole matrix of [..., m, n] shards, in fp32."""
        return self.sum(matrices.float().square().sum((-2, -1)))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole matrix from its shards (rank order)."""
        if self.side is None:
            return local
        return all_gathered(local, self.group, dim=-2 if self.side == "rows" else -1)

    def local(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        return full.chunk(dist.get_world_size(self.group), dim=dim)[dist.get_rank(self.group)].contiguous()

    def local_matrix(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.side is None else self.local(full, -2 if self.side == "rows" else -1)

    def local_basis(self, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the basis of the whole matrix: Q's for split rows, V's for split columns."""
        if self.side is None:
            return q, v
        return (self.local(q, -2), v) if self.side == "rows" else (q, self.local(v, -2))


UNSHARDED = Shards(None, None)


def complement(grad: torch.Tensor, q: torch.Tensor, v: torch.Tensor, shards: Shards = UNSHARDED) -> torch.Tensor:
    """(I - QQ^T) G (I - VV^T): G [..., m, n], Q [..., m, k], V [..., n, k] (this rank's shards)."""
    batch = grad.shape[:-2]
    flat = lambda t: t.expand(*batch, *t.shape[-2:]).reshape(batch.numel(), *t.shape[-2:])  # noqa: E731
    grad, q, v = flat(grad), flat(q), flat(v)
    return _without(grad, q, v, *_factors(grad, q, v, shards)).view(batch + grad.shape[-2:])


def _factors(grad: torch.Tensor, q: torch.Tensor, v: torch.Tensor, shards: Shards):
    """The k-dimensional factors of G [N, m, n] against its basis Q [N, m, k], V [N, n, k]:
    G = comp + Q A + B V^T with comp = (I - P) G (I - R), A = Q^T G [N, k, n], B = (I - P) G V
    [N, m, k]. Two reads of G. Row-split G and Q: A sums over the shards; column-split G and V: B
    does. Plain bmm on 3-d operands: matmul's broadcasting would add a dozen host-side ops per
    call, which is what a small layer's step time on a GPU is made of."""
    a = torch.bmm(q.mT, grad)
    if shards.side == "rows":
        a = shards.sum(a)
    b = torch.baddbmm(torch.bmm(grad, v), q, torch.bmm(a, v), alpha=-1)
    if shards.side == "cols":
        b = shards.sum(b)
    return a, b


def _without(grad: torch.Tensor, q: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G - Q A - B V^T as one batched GEMM (one read of G, one write): G's complement when A, B
    are its own factors."""
    if q.shape[-1] == 0:  # rank 0: everything goes to U, exactly
        return grad
    return torch.baddbmm(grad, torch.cat([q, b], dim=-1), torch.cat([a, v.mT], dim=-2), alpha=-1)


class DeferredFactors:
    """Gradient accumulation, one weight: the routing is linear and the basis fixed within a step,
    so a step's earlier micro-batches give U their gradient G unrouted and keep only its factors
    A, B (summed in fp32); the last subtracts Q (sum A) + (sum B) V^T from its own once, which
    routes the step's summed gradient. That saves the complement's pass (a read and a write of
    G) on every micro-batch but the last, for the same gradients up to round-off."""

    def __init__(self):
        self.a = self.b = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.a is None:
            self.a, self.b = a.float(), b.float()
        else:
            self.a += a
            self.b += b

    def total(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sums with the last micro-batch's A, B; forgets them for the next step."""
        if self.a is None:
            return a, b
        sums = (self.a + a).to(a.dtype), (self.b + b).to(b.dtype)
        self.a = self.b = None
        return sums


class SpectralSplit(torch.autograd.Function):
    """W_e = C_g(e) + U_e forward; backward routes dL/dW into the complement (to U) and the rest (to C).

    common [G, B*m, n] holds the local groups' C, unique [G*S, B*m, n] their S experts each. W's
    rows stack B projections with bases of their own (fc1 = [gate; up]): Q [G, B, m, k],
    V [G, B, n, k], all split over expert TP as `shards` says. The G*S*B blocks are one batch of
    the routing, so the gradients are written in place, not concatenated. `computed`: W as an
    earlier forward with the same C and U computed it, returned instead of a new sum. `deferred`:
    the step's DeferredFactors for this weight; `more` says micro-batches of the step follow.
    """

    @staticmethod
    def forward(ctx, common, unique, q, v, shards, computed, deferred, more):
        ctx.save_for_backward(q, v)
        ctx.shards, ctx.deferred, ctx.more = shards, deferred, more
        if computed is not None:
            return computed  # an input returned as is: autograd hands out a view of it
        return (unique.unflatten(0, (common.shape[0], -1)) + common.unsqueeze(1)).flatten(0, 1)

    @staticmethod
    def backward(ctx, grad):
        q, v = ctx.saved_tensors
        (groups, blocks, m, _), n = q.shape, v.shape[-2]
        experts = grad.shape[0] // groups
        # every expert's block gets its group's basis: [G*S*B, m, k] and [G*S*B, n, k]
        per_block = lambda t: t.unsqueeze(1).expand(groups, experts, *t.shape[1:]).reshape(  # noqa: E731
            groups * experts * blocks, *t.shape[-2:])
        flat, q_blocks, v_blocks = grad.reshape(-1, m, n), per_block(q), per_block(v)
        a, b = _factors(flat, q_blocks, v_blocks, ctx.shards)
        # sum_e (Q A_e + B_e V^T) = [Q, sum_e B_e] [sum_e A_e; V^T] over a group: no pass over G
        a_sum, b_sum = (t.view(groups, experts, blocks, *t.shape[-2:]).sum(1).flatten(0, 1) for t in (a, b))
        grad_common = torch.bmm(torch.cat([q.flatten(0, 1), b_sum], dim=-1),
                                torch.cat([a_sum, v.flatten(0, 1).mT], dim=-2)).view(groups, blocks * m, n)
        if ctx.more:
            ctx.deferred.add(a, b)
            return grad_common, grad, None, None, None, None, None, None
        grad_unique = _without(flat, q_blocks, v_blocks, *ctx.deferred.total(a, b)).view(grad.shape)
        return grad_common, grad_unique, None, None, None, None, None, None


def top_singular_vectors(matrices: torch.Tensor, rank: int, seeds: list[int], power_iterations: int,
                         oversample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` left and right singular vectors of each of `matrices` [N, m, n], [N, m, rank] and
    [N, n, rank], by one batched randomized SVD: torch.svd_lowrank's algorithm (Gaussian range
    finder, QR, power iterations, SVD of the small projection). Written out because svd_lowrank
    draws one test matrix for the whole batch from the global RNG; here matrix i's is drawn from
    seeds[i], so its basis is the same whatever shares the batch (each parallel layout batches
    other groups), and a refresh is one batched call instead of one call per matrix. The draws come
    from CPU generators, so a GPU run computes the bases a CPU run does (up to round-off)."""
    _, m, n = matrices.shape
    a = matrices.float()
    draws = [torch.randn(n, min(rank + oversample, m, n), generator=torch.Generator().manual_seed(seed))
             for seed in seeds]
    basis = torch.linalg.qr(a @ torch.stack(draws).to(a.device)).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u, _, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return (basis @ u[..., :rank]).to(matrices.dtype), vh[..., :rank, :].mT.to(matrices.dtype).contiguous()


class SDMoEExperts(GroupedExperts):
    """Grouped experts whose weights are C + U_e. `linear_fc1` / `linear_fc2` hold the unique parts
    (same layout and parallel attributes as GroupedExperts), `common_fc1` / `common_fc2` the common ones."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, name=None, *,
                 sdmoe: SDMoEConfig, seed: int, group_size: int | None = None, **sizes):
        """group_size: experts per common matrix with sdmoe.common=shared (default: all the layer's)."""
        super().__init__(num_local_experts, config, pg_collection, name, **sizes)
        self.sdmoe, self.seed = sdmoe, seed
        self.layer_key = ""  # the module's name in the model, set by prepare(); seeds the SVDs
        # Gradient accumulation: C and U change only after a step's last micro-batch, so the
        # training loop sets more_micro_batches for the others: the next forward reuses their W,
        # and their gradient routing is completed by the last one (DeferredFactors).
        self.more_micro_batches, self.kept = False, (None, None)
        self.deferred = {"fc1": DeferredFactors(), "fc2": DeferredFactors()}
        cfg, ffn = sdmoe, self.linear_fc2.shape[-1]
        self.decoupled = [p for p in PROJECTIONS if cfg.rank and p in cfg.projections]  # the others: C = 0
        expert_tp = pg_collection.expt_tp if pg_collection is not None else ps.get_expert_tensor_parallel_group()
        self.shards = {p: Shards(expert_tp, SHARDED_SIDE[p]) for p in PROJECTIONS}
        self.shared = cfg.common == "shared"
        ep_rank = pg_collection.ep.rank() if pg_collection is not None else ps.get_expert_model_parallel_rank()
        first = ep_rank * num_local_experts  # global index of the first local expert
        size = (group_size or config.num_moe_experts) if self.shared else 1
        n_local_groups = max(num_local_experts // size, 1)  # config validation: one divides the other
        self.group_size = size
        group_ids = [first // size + g for g in range(n_local_groups)]  # global ids of the local groups
        # what each basis belongs to (seeds its SVD): a group, or an expert
        self.basis_ids = group_ids if self.shared else list(range(first, first + num_local_experts))
        # shared: every group's C on every rank (dense); per_expert: the local experts' own (expert parameter)
        groups = config.num_moe_experts // size if self.shared else num_local_experts
        self.local_groups = slice(group_ids[0], group_ids[-1] + 1) if self.shared else slice(None)
        self.common_fc1 = self._common(self.linear_fc1, groups, config)
        self.common_fc2 = self._common(self.linear_fc2, groups, config)
        # Bases of the local groups only, per weight and row block. A projection left out keeps a
        # zero basis: its whole gradient goes to U and its C stays 0, as with rank 0.
        d_in, d_out, dtype, device = self.input_size, self.output_size, self.linear_fc1.dtype, self.linear_fc1.device
        for weight, blocks, (m, n) in (("fc1", 2, (ffn, d_in)), ("fc2", 1, (d_out, ffn))):
            self.register_buffer(f"q_{weight}", torch.zeros(n_local_groups, blocks, m, cfg.rank, dtype=dtype, device=device))
            self.register_buffer(f"v_{weight}", torch.zeros(n_local_groups, blocks, n, cfg.rank, dtype=dtype, device=device))

    def _common(self, unique: torch.nn.Parameter, groups: int, config: TransformerConfig) -> torch.nn.Parameter:
        param = torch.nn.Parameter(torch.zeros(groups, *unique.shape[1:], dtype=unique.dtype, device=unique.device))
        param.derived = True  # split_initial_weights computes it from the experts' weights: never drawn
        if self.shared and self.shards["down"].group is None:
            # A dense parameter, replicated on every rank. Its gradient must sum the terms of every
            # expert on every rank: the data-parallel reduction covers the ranks of one TP position;
            # under TP the engine's sequence-parallel hook sums over TP as well (each TP rank's
            # experts saw only its part of the sequence).
            param.sequence_parallel = config.tensor_model_parallel_size > 1
        elif self.shared:
            # Split like U over expert TP, which equals TP (config validation): a TP-sharded dense
            # parameter. Each shard's experts saw all tokens of the TP group, so the data-parallel
            # reduction alone completes its gradient.
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=unique.partition_dim,
                                                 stride=unique.partition_stride)
        else:  # one C_e per expert: an expert parameter like the unique part
            param.allreduce, param.stacked_experts = unique.allreduce, True
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                setattr(param, attr, getattr(unique, attr))
        return param

    def basis_splits(self) -> dict[str, tuple[torch.Tensor, dict]]:
        """How a layout splits the bases (models/init.py: split_record): dim 0 stacks them by group
        (or expert) id over EP, and the split side's factor has this expert-TP rank's rows (gate and
        up: Q's, down: V's)."""
        split = {"stride": 1, "experts": True, "weight": False, "first": self.basis_ids[0]}
        return {name: (getattr(self, name), {**split, "dim": 2 if name in ("q_fc1", "v_fc2") else None})
                for name in ("q_fc1", "v_fc1", "q_fc2", "v_fc2")}

    # -- forward -----------------------------------------------------------------------------
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        common_fc1, common_fc2 = self.common_fc1[self.local_groups], self.common_fc2[self.local_groups]
        (kept_fc1, kept_fc2), more = self.kept, self.more_micro_batches
        fc1 = SpectralSplit.apply(common_fc1, self.linear_fc1, self.q_fc1, self.v_fc1, self.shards["gate"], kept_fc1,
                                  self.deferred["fc1"], more)
        fc2 = SpectralSplit.apply(common_fc2, self.linear_fc2, self.q_fc2, self.v_fc2, self.shards["down"], kept_fc2,
                                  self.deferred["fc2"], more)
        self.kept = (fc1.detach(), fc2.detach()) if more else (None, None)
        return fc1, fc2

    # -- the common matrices per projection --------------------------------------------------
    def commons(self, groups: slice | None = None) -> dict[str, torch.Tensor]:
        """Common matrices per projection, [groups, m, n] (this rank's shards): the local groups'
        by default."""
        groups = self.local_groups if groups is None else groups
        return by_projection(self.common_fc1[groups], self.common_fc2[groups])

    def basis(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Q, V of `proj` for the local groups (views), [groups, m, k] and [groups, n, k]."""
        weight, block = BLOCK[proj]
        return getattr(self, f"q_{weight}")[:, block], getattr(self, f"v_{weight}")[:, block]

    def expert_basis(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Q, V of `proj` for every local expert (its group's), [experts, m, k] and [experts, n, k]."""
        q, v = self.basis(proj)
        repeat = self.num_local_experts // q.shape[0]
        return q.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)

    def uniques(self) -> dict[str, torch.Tensor]:
        return by_projection(self.linear_fc1, self.linear_fc2)

    @torch.no_grad()
    def unique_off_complement(self) -> torch.Tensor | None:
        """Per local expert, the share of |U_e|^2 outside the two-sided complement of its basis,
        mean over the decoupled projections (None: none is): 0 while the decoupling is exact (after
        the initial split, and within a refresh interval under SGD or with sdmoe.project_updates);
        Adam's updates and basis refreshes move U_e out of the complement."""
        shares, uniques = [], self.uniques()
        for proj in self.decoupled:
            shards = self.shards[proj]
            total = shards.squared_norms(uniques[proj])
            outside = total - shards.squared_norms(self._expert_complement(proj, uniques[proj]))
            shares.append(outside / total.clamp(min=torch.finfo(torch.float32).tiny))
        return torch.stack(shares).mean(0) if shares else None

    def _expert_complement(self, proj: str, matrices: torch.Tensor) -> torch.Tensor:
        """(I - P) M_e (I - R) in fp32 for each local expert's matrix of `proj`, with its basis."""
        q, v = self.expert_basis(proj)
        return complement(matrices.float(), q.float(), v.float(), self.shards[proj])

    def _seed(self, proj: str, step: int, group: int) -> int:
        key = zlib.crc32(f"{self.layer_key}.{proj}".encode())
        return (self.seed * 1_000_003 + key + 7919 * step + 104_729 * group) % 2**63

    def _bases(self, matrices: dict[str, torch.Tensor], step: int, ids: list[int]) -> dict[str, tuple]:
        """Top-k singular vectors (Q, V) of each group's whole matrix {proj: [groups, m, n]}, one
        batched randomized SVD per shape (down enters transposed: gate, up and down then share one
        when an expert reads and writes the same width), each matrix seeded by layer, projection,
        step and its group's global id (`ids`), so every layout computes the same basis."""
        oriented = {proj: matrix.mT if proj == "down" else matrix for proj, matrix in matrices.items()}
        bases, cfg = {}, self.sdmoe
        for shape in {matrix.shape for matrix in oriented.values()}:
            batch = [proj for proj, matrix in oriented.items() if matrix.shape == shape]
            seeds = [self._seed(proj, step, group) for proj in batch for group in ids]
            left, right = top_singular_vectors(torch.cat([oriented[proj] for proj in batch]), cfg.rank, seeds,
                                               cfg.power_iterations, cfg.oversample)
            for proj, q, v in zip(batch, left.split(len(ids)), right.split(len(ids))):
                bases[proj] = (v, q) if proj == "down" else (q, v)
        return bases

    @torch.no_grad()
    def refresh_bases(self, step: int) -> None:
        """Q, V <- top-k singular vectors of the current C (same result on every rank: C is
        replicated, or gathered whole over expert TP, and the random range finder is seeded by
        layer, projection, group and step)."""
        commons = self.commons()
        whole = {proj: self.shards[proj].gather(commons[proj]) for proj in self.decoupled}
        for proj, (q, v) in self._bases(whole, step, self.basis_ids).items():
            self._set_basis(proj, *self.shards[proj].local_basis(q, v))

    def _set_basis(self, proj: str, q: torch.Tensor, v: torch.Tensor) -> None:
        old_q, old_v = self.basis(proj)
        old_q.copy_(q)
        old_v.copy_(v)

    @torch.no_grad()
    def split_initial_weights(self, keep: bool = False) -> None:
        """From initial expert weights W_e (held in the unique parameters): C = rank-k truncation
        of the mean expert (shared) or of W_e itself (per_expert), U_e = the two-sided complement
        projection of W_e - C, scaled so that C + U_e keeps the norm of the drawn W_e (drawn
        weights), or W_e - C itself (`keep`: imported weights, whose function continued pretraining
        must start from), and the basis of C.

        Shared commons are dense parameters (DeepSpeed broadcasts them from one rank), so every
        rank computes every group's C, not only the groups of its own experts."""
        every_group, uniques, local = slice(None), self.uniques(), len(self.common_fc1[self.local_groups])
        self.common_fc1.zero_()  # C = 0 for a projection left out (the model's initialisation drew it)
        self.common_fc2.zero_()
        targets = {}
        for proj in self.decoupled:
            unique = uniques[proj]
            if self.shared:  # each group's mean expert: sums of the local experts, completed over EP
                sums = unique.new_zeros(self.common_fc1.shape[0], *unique.shape[1:], dtype=torch.float32)
                sums[self.local_groups] = unique.unflatten(0, (local, -1)).sum(1, dtype=torch.float32)
                dist.all_reduce(sums, group=ps.get_expert_model_parallel_group())
                targets[proj] = self.shards[proj].gather((sums / self.group_size).to(unique.dtype))
            else:
                targets[proj] = self.shards[proj].gather(unique)
        ids = list(range(self.common_fc1.shape[0])) if self.shared else self.basis_ids
        for proj, (q, v) in self._bases(targets, -1, ids).items():
            shards, unique, target = self.shards[proj], uniques[proj], targets[proj]
            common = shards.local_matrix(q @ (q.transpose(-2, -1) @ target @ v) @ v.transpose(-2, -1))  # rank k
            self.commons(every_group)[proj].copy_(common)
            self._set_basis(proj, *shards.local_basis(q[self.local_groups], v[self.local_groups]))
            common = common[self.local_groups].repeat_interleave(unique.shape[0] // local, 0)
            if keep:
                unique.sub_(common)
            else:
                unique.copy_(self._complement_at_drawn_norm(proj, unique, common))

    def _complement_at_drawn_norm(self, proj: str, drawn: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
        """U_e = (I - P)(W_e - C)(I - R), scaled to |U_e|^2 = |W_e|^2 - |C|^2 (in fp32). C and U_e are
        orthogonal (C lies in span(Q) x span(V), U_e in its complement), so |C + U_e| = |W_e|: the
        drawn scale methods.md asks for. Unscaled, the complement would drop the parts of W_e - C in
        span(Q) x (I - R), (I - P) x span(V) and, for a shared C, span(Q) x span(V): about k/m + k/n
        of their energy."""
        shards = self.shards[proj]
        unique = self._expert_complement(proj, drawn.float() - common.float())
        target, norms = shards.squared_norms(drawn) - shards.squared_norms(common), shards.squared_norms(unique)
        scale = torch.where(norms > 0, (target.clamp(min=0) / norms).sqrt(), 1.0)  # an all-zero U_e stays 0
        return unique * scale[:, None, None]


def sdmoe_modules(model: torch.nn.Module) -> list[SDMoEExperts]:
    return [m for m in model.modules() if isinstance(m, SDMoEExperts)]


def prepare(model: torch.nn.Module, imported: bool, split: bool) -> None:
    """Name every SD-MoE layer and, after baseline initialisation (`imported`: from
    model.init_from), split its initial weights (`split=False`: a checkpoint brings them)."""
    for name, module in model.named_modules():
        if isinstance(module, SDMoEExperts):
            module.layer_key = name
            if split:
                module.split_initial_weights(keep=imported)


class UpdateProjector:
    """`sdmoe.project_updates`: after each optimizer step, keep only the two-sided complement part
    of every unique matrix's change, so the decoupling stays exact under Adam.

    The projection is applied to DeepSpeed's fp32 master weights (safe_get/set_full_fp32_param,
    which assemble and write back each ZeRO partition) and mirrored into the model's weights.
    """

    def __init__(self, layers: list[SDMoEExperts]):
        self.layers = layers
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        """The fp32 master weights before the step (in bf16 the model's weights are their rounding)."""
        self.before = [(safe_get_full_fp32_param(layer.linear_fc1).clone(),
                        safe_get_full_fp32_param(layer.linear_fc2).clone()) for layer in self.layers]

    @torch.no_grad()
    def project(self) -> None:
        for layer, (old_fc1, old_fc2) in zip(self.layers, self.before):
            new_fc1, new_fc2 = safe_get_full_fp32_param(layer.linear_fc1), safe_get_full_fp32_param(layer.linear_fc2)
            old, new = by_projection(old_fc1, old_fc2), by_projection(new_fc1, new_fc2)
            for proj in layer.decoupled:  # in place: views of new_fc1, new_fc2 (the others' basis is 0)
                q, v = (basis.float() for basis in layer.expert_basis(proj))
                new[proj].copy_(old[proj] + complement(new[proj] - old[proj], q, v, layer.shards[proj]))
            for param, full in ((layer.linear_fc1, new_fc1), (layer.linear_fc2, new_fc2)):
                safe_set_full_fp32_param(param, full)
                param.copy_(full.to(param.dtype))
