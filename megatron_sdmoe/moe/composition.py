"""Route-wise effective composition number (docs/methods.md section 3).

For each route r (the set of experts a token is sent to; under head-wise routing, the experts one
head of the token is sent to, which identify the head) N_eff(r) = 1 / sum_c p(c|r)^2, where c
is the token's composition label: the source dataset of its sample in the blend (its domain),
crossed with the bucket of its position when `moe.diag_position_buckets` > 1.
N_eff = 1 means a route serves one domain; N_eff = number of domains means it does not tell them
apart. Reported per MoE layer as the token-weighted mean over routes.

Recorded on the diagnostics' training steps (labels: source dataset) and, with data.stages, at each
stage end over every seen stage's validation tokens (labels: stage), where a single stage's data
would give one label. Routers are observed by forward hooks while `recording`; tokens reach a
router as [s, b] flattened sequence-major, each TP rank holding a contiguous slice of positions
under sequence parallelism. Counts are summed over all ranks (each token is routed on exactly one
rank), each route's on the rank that owns it (counting.py).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sdmoe.moe.counting import Counts, counted, mixed, owned_sums, summed


def route_words(experts: int) -> int:
    """How many int64 words route_ids gives a route among `experts` (63 experts per word)."""
    return -(-experts // 63)


def route_ids(routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E] bool -> [T, W] int64 words that identify each row's expert set (63 experts per word)."""
    tokens, experts = routing_map.shape
    width = route_words(experts)
    padded = torch.zeros(tokens, width * 63, dtype=torch.int64, device=routing_map.device)
    padded[:, :experts] = routing_map.long()
    bits = torch.arange(63, device=routing_map.device, dtype=torch.int64)
    return (padded.view(tokens, width, 63) << bits).sum(-1)


def composition_sums(counts: Counts) -> list[float]:
    """(keys [n, route words + label], tokens) -> [sum over routes of N_r / sum_c p(c|r)^2, sum of N_r],
    N_r a route's tokens: their ratio is N_eff; sums over disjoint sets of routes add up."""
    keys, tokens = counts
    routes, route = torch.unique(keys[:, :-1], dim=0, return_inverse=True)
    n = tokens.double()
    per_route = torch.zeros(len(routes), dtype=torch.float64).index_add_(0, route, n)
    squares = torch.zeros_like(per_route).index_add_(0, route, n * n)
    return [(per_route ** 3 / squares).sum().item(), per_route.sum().item()]


def effective_composition(weighted: float, tokens: float) -> float:
    """composition_sums' two sums -> N_eff, the token-weighted mean over routes of 1 / sum_c p(c|r)^2
    (NaN without tokens)."""
    return weighted / tokens if tokens else float("nan")


class RouterObserver:
    """Forward hooks on every router of `model` (`routers`; their module names, `names`): while
    `recording`, each router's routing weights and map [rows, experts] go to `add` with the labels
    of its rows (`labels`; the micro-batch being run is `batch`, which the training loop sets)."""

    def __init__(self, model: torch.nn.Module):
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, TopKRouter)]
        self.names, self.routers = [name for name, _ in found], [m for _, m in found]
        self.batch: dict[str, torch.Tensor] | None = None  # the micro-batch being run
        self.recording = False
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, _inputs, output):
            # a recomputed training forward runs twice, once without grad: count the other
            if self.recording and (not module.training or torch.is_grad_enabled()):
                heads = getattr(module, "heads", 1)  # a head-wise router's rows are sub-tokens, heads innermost
                labels = self.labels(output[1].shape[0] // heads).repeat_interleave(heads).to(output[1].device)
                self.add(index, *output, labels)
        return count

    def add(self, index: int, probs: torch.Tensor, routing_map: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def labels(self, tokens: int) -> torch.Tensor:
        """Labels of the router's `tokens` = [s_local, b] flattened."""
        batch = len(self.batch["domain"])
        local = tokens // batch
        tp = ps.get_tensor_model_parallel_world_size()  # sequence parallel whenever TP > 1
        positions = ps.get_tensor_model_parallel_rank() * local + torch.arange(local) if tp > 1 else torch.arange(local)
        return self.position_labels(positions, local * tp).reshape(-1)

    def position_labels(self, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
        """[len(positions), b]: the labels of those positions of the micro-batch's samples."""
        raise NotImplementedError


class RouteComposition(RouterObserver):
    def __init__(self, model: torch.nn.Module, position_buckets: int = 1):
        super().__init__(model)
        self.position_buckets = position_buckets
        self.counts: list[list[Counts]] = [[] for _ in self.routers]  # per router: (route words + label, tokens)
        self.fixed_label: int | None = None  # label every token with this instead (e.g. its stage)

    def add(self, index: int, _probs, routing_map: torch.Tensor, labels: torch.Tensor) -> None:
        """Count router `index`'s routes [rows, experts] against the rows' labels."""
        self.counts[index].append(counted(torch.cat([route_ids(routing_map), labels[:, None]], dim=1)))

    def position_labels(self, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
        """[len(positions), b]: each sample's domain crossed with the position's bucket."""
        domains = self.batch["domain"].cpu()
        if self.fixed_label is not None:
            domains = torch.full_like(domains, self.fixed_label)
        buckets = positions * self.position_buckets // seq_length
        return domains[None, :] * self.position_buckets + buckets[:, None]

    def compute(self) -> list[float]:
        """N_eff per router over the tokens recorded since the last call, on every rank's counts (a
        collective)."""
        sums = []
        for router, parts in zip(self.routers, self.counts):
            width = route_words(router.weight.shape[0]) + 1  # then the label
            sums.append(composition_sums(owned_sums(parts, width, lambda keys: mixed(keys[:, :-1]))))
        self.counts = [[] for _ in self.routers]
        return [effective_composition(*pair) for pair in summed(sums)]
