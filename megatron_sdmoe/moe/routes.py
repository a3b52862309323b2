"""Which tokens each expert takes (`sdmoe-eval --routes`).

Over the validation tokens a checkpoint is evaluated on, every MoE router's choices are counted
per (expert, source dataset, token id), through composition.py's router hooks. Then, per expert
of each router:
- load: its share of the router's routings (rows x k, fewer where a capacity drops tokens);
- top tokens: the tokens it takes most often, as a share of the token's rows that could reach it
  (1.0: every one does), among tokens with at least `min_count` rows: OLMoE's token specialisation
  (arXiv 2409.02060, section 5). A row is a token, or under head-wise routing a head's sub-token,
  which can reach only its head's bank of experts with per-head banks; `rows` counts the token's
  rows that could reach the expert;
- with a blend, each source dataset's lift: its share of the expert's rows over its share of all
  rows (1.0: no preference).
Per router, `token_concentration`: the row-weighted mean over tokens of their largest share, to
set against k / (experts in a bank), what routing that ignores the token gives. Training logs it at
each evaluation with the diagnostics on (`val_token_concentration`), through `concentration`.

`route_text` shows one text's routes instead: each token's experts in every router, by weight.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sdmoe.moe.composition import RouterObserver
from megatron_sdmoe.moe.counting import Counts, counted, on_first_rank, owned_sums, summed


class RouteTokens(RouterObserver):
    """Per router, how often each (expert, source dataset, token id) is routed and how many rows
    each (source dataset, token id) has; counted as tensors (keys: label = domain x vocab_size +
    token, pair = expert x labels + label), so millions of tokens over many layers stay cheap; summed
    over ranks by token (counting.py), so the statistics of a token are all on one rank."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, domains: int):
        super().__init__(model)
        self.vocab_size, self.labels_count = vocab_size, domains * vocab_size
        self.pairs: list[list[Counts]] = [[] for _ in self.routers]
        self.rows: list[list[Counts]] = [[] for _ in self.routers]

    def position_labels(self, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
        tokens = self.batch["tokens"].cpu()[:, positions]  # [b, len(positions)]
        return self.batch["domain"].cpu()[None, :] * self.vocab_size + tokens.T

    def add(self, index: int, _probs, routing_map: torch.Tensor, labels: torch.Tensor) -> None:
        rows, experts = routing_map.nonzero(as_tuple=True)
        self.pairs[index].append(counted((experts * self.labels_count + labels[rows])[:, None]))
        self.rows[index].append(counted(labels[:, None]))

    def owned(self) -> list[tuple[Counts, Counts]]:
        """Per router (pairs, rows) since the last call, summed over every rank for the tokens this
        rank owns (a collective)."""
        def token(keys: torch.Tensor) -> torch.Tensor:  # of a pair's or a row's key
            return keys[:, 0] % self.labels_count % self.vocab_size

        owned = [tuple(owned_sums(parts, 1, token) for parts in (pairs, rows))
                 for pairs, rows in zip(self.pairs, self.rows)]
        self.pairs, self.rows = [[] for _ in self.routers], [[] for _ in self.routers]
        return owned

    def report(self, domains: list[str], decode, top: int, min_count: int) -> dict | None:
        """On rank 0 {"datasets": the blend's source datasets, "routers": per router the statistics
        above}, None on the others (a collective)."""
        counts = on_first_rank([part for router in self.owned() for part in router])
        if counts is None:
            return None
        counts = [_flat(c) for c in counts]
        return {"datasets": domains, "routers": [
            router_report(name, pairs, rows, router.weight.shape[0], getattr(router, "banks", 1), router.topk,
                          self.vocab_size, domains, decode, top, min_count)
            for name, router, pairs, rows in zip(self.names, self.routers, counts[0::2], counts[1::2])]}

    def concentration(self) -> list[float]:
        """`token_concentration` per router (a collective): each rank adds up its own tokens' largest
        shares, then the sums are summed."""
        sums = []
        for router, (pairs, rows) in zip(self.routers, self.owned()):
            pairs, rows = _flat(pairs), _flat(rows)
            ids = torch.unique(rows[0] % self.vocab_size)
            reaching = token_reaching(pairs, ids, router.weight.shape[0], self.labels_count, self.vocab_size)
            sums.append([largest_shares(reaching, getattr(router, "banks", 1)), rows[1].sum().item()])
        return [largest / rows if rows else float("nan") for largest, rows in summed(sums)]


class RouteCapture(RouterObserver):
    """The experts of each position of one sequence in every router, by routing weight (a head-wise
    router's heads one after another)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.chosen: list[dict[int, list[int]]] = [{} for _ in self.routers]

    def position_labels(self, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
        return positions[:, None]  # one sample

    def add(self, index: int, probs: torch.Tensor, routing_map: torch.Tensor, labels: torch.Tensor) -> None:
        order = torch.where(routing_map, probs.float(), -1.0).argsort(dim=1, descending=True, stable=True)
        for position, row, count in zip(labels.tolist(), order.tolist(), routing_map.sum(1).tolist()):
            self.chosen[index].setdefault(position, []).extend(row[:count])


def route_text(model: torch.nn.Module, tokens: torch.Tensor, tensor_parallel: int, pad: int, decode) -> dict:
    """{"tokens": the tokens' texts, "routers": {router: each token's experts}} for `tokens` [s]: every
    rank runs the same sequence (tensor-parallel ranks each route their slice of it under sequence
    parallelism, so it is padded with `pad` to a multiple of their number: after the text, which
    causal attention keeps from changing its routes); a collective."""
    capture = RouteCapture(model)
    padded = torch.cat([tokens, tokens.new_full((-len(tokens) % tensor_parallel,), pad)])
    capture.batch, capture.recording = {"domain": torch.zeros(1, dtype=torch.int64), "tokens": padded[None]}, True
    with torch.no_grad():
        model(padded[None], torch.arange(len(padded), device=tokens.device)[None], None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, capture.chosen)
    seen = [{p: experts for rank in gathered for p, experts in rank[i].items()} for i in range(len(capture.names))]
    routers = {name: [seen[i][p] for p in range(len(tokens))] for i, name in enumerate(capture.names)
               if seen[i]}  # (a multi-token-prediction layer routes only when the loss is computed)
    return {"tokens": [decode(t) for t in tokens.tolist()], "routers": routers}


def text_lines(text: dict) -> list[str]:
    """A row per token, a column per router (its experts, by weight)."""
    names = list(text["routers"])
    columns = [[" ".join(map(str, experts)) for experts in text["routers"][name]] for name in names]
    widths = [max(len(f"R{i}"), *map(len, column)) for i, column in enumerate(columns)]
    token_width = max(len(repr(t)) for t in text["tokens"])
    lines = [f"  R{i}: {name}" for i, name in enumerate(names)]
    lines.append((f"  {'token':<{token_width}}  " + "  ".join(f"R{i}".ljust(w) for i, w in enumerate(widths))).rstrip())
    for position, token in enumerate(text["tokens"]):
        lines.append((f"  {token!r:<{token_width}}  " + "  ".join(column[position].ljust(w)
                                                                  for column, w in zip(columns, widths))).rstrip())
    return lines


def _flat(counts: Counts) -> Counts:
    """Counts of one-word keys [n, 1] as keys [n]."""
    return counts[0][:, 0], counts[1]


def router_report(name: str, pairs: Counts, rows: Counts, num_experts: int, banks: int, topk: int,
                  vocab_size: int, domains: list[str], decode, top: int, min_count: int) -> dict:
    """`pairs`: rows per (expert, label); `rows`: rows per label (label = domain x vocab_size +
    token); `decode`: token id -> text."""
    labels_count = len(domains) * vocab_size
    ids, column = torch.unique(rows[0] % vocab_size, return_inverse=True)  # the tokens seen: columns
    token_rows = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, column, rows[1].double())
    domain_rows = torch.zeros(len(domains), dtype=torch.float64).index_add_(0, rows[0] // vocab_size,
                                                                            rows[1].double())
    reaching = token_reaching(pairs, ids, num_experts, labels_count, vocab_size)  # [E, tokens]
    expert, label = pairs[0] // labels_count, pairs[0] % labels_count
    domain_reaching = torch.zeros(num_experts, len(domains), dtype=torch.float64)  # [E, domains]
    domain_reaching.index_put_((expert, label // vocab_size), pairs[1].double(), accumulate=True)
    eligible = token_rows / banks  # a token's rows that can reach an expert (per-head banks: one head's)
    share = reaching / eligible  # [E, tokens]
    total = token_rows.sum().item()
    seen = eligible >= min_count
    by_rows = token_rows.argsort(descending=True, stable=True)  # ties in share: the commoner token first
    experts = []
    for e in range(num_experts):
        ranked = by_rows[torch.where(seen, share[e], -1.0)[by_rows].argsort(descending=True, stable=True)][:top]
        entry = {"expert": e, "load": reaching[e].sum().item() / reaching.sum().item(),
                 "top_tokens": [{"id": int(ids[t]), "text": decode(int(ids[t])), "share": share[e, t].item(),
                                 "rows": int(eligible[t].item())} for t in ranked.tolist() if seen[t]]}
        if len(domains) > 1:
            expert_rows = domain_reaching[e].sum().item()
            entry["domain_lift"] = {domain: (domain_reaching[e, d].item() / expert_rows)
                                    / (domain_rows[d].item() / total) if expert_rows and domain_rows[d] else None
                                    for d, domain in enumerate(domains)}
        experts.append(entry)
    return {"router": name, "experts": num_experts, "banks": banks, "topk": topk, "rows": int(total),
            "token_concentration": token_concentration(reaching, total, banks),
            "uniform_concentration": topk * banks / num_experts, "per_expert": experts}


def token_reaching(pairs: Counts, ids: torch.Tensor, num_experts: int, labels_count: int,
                   vocab_size: int) -> torch.Tensor:
    """[E, len(ids)]: each token's rows (over source datasets) that reach each expert."""
    expert, token = pairs[0] // labels_count, pairs[0] % labels_count % vocab_size
    reaching = torch.zeros(num_experts, len(ids), dtype=torch.float64)
    return reaching.index_put_((expert, torch.searchsorted(ids, token)), pairs[1].double(), accumulate=True)


def token_concentration(reaching: torch.Tensor, rows: float, banks: int) -> float:
    """The row-weighted mean over tokens of their largest share, over `rows`."""
    return largest_shares(reaching, banks) / rows if rows else float("nan")


def largest_shares(reaching: torch.Tensor, banks: int) -> float:
    """sum_t rows_t x (token t's largest share) = sum_t max_e reaching[e, t] x banks (a token's rows
    that can reach an expert are rows_t / banks); sums over disjoint sets of tokens add up."""
    return banks * reaching.max(0).values.sum().item()


def report_lines(report: dict) -> list[str]:
    lines = []
    for layer in report["routers"]:
        banks = f" in {layer['banks']} banks" if layer["banks"] > 1 else ""
        lines.append(f"{layer['router']} ({layer['experts']} experts{banks}, top-{layer['topk']}, "
                     f"{layer['rows']:,} rows): token concentration {layer['token_concentration']:.3f} "
                     f"(routing blind to the token: {layer['uniform_concentration']:.3f})")
        for entry in layer["per_expert"]:
            lift = "".join(f" {domain} {_number(x)}" for domain, x in entry.get("domain_lift", {}).items())
            tokens = ", ".join(f"{t['text']!r} {t['share']:.2f} ({t['rows']})" for t in entry["top_tokens"])
            lines.append(f"  expert {entry['expert']:>3}  load {entry['load']:6.1%}"
                         + (f"  lift{lift}" if lift else "") + f"  {tokens}")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path, text: dict | None = None) -> None:
    """Routers x experts heatmaps: the load, and with a blend each source dataset's lift (log2);
    with `text` (route_text's), routers x its tokens coloured by each token's first expert."""
    layers, domains = report["routers"], report["datasets"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer["router"] for layer in layers]
    experts = list(range(layers[0]["experts"]))
    panels = [("load (share of routings)", [[e["load"] for e in layer["per_expert"]] for layer in layers], "viridis",
               (None, None), "expert", names, experts)]
    panels += [(f"{domain}: log2 lift", [[_log2(e["domain_lift"][domain]) for e in layer["per_expert"]]
                                        for layer in layers], "coolwarm", (-2.0, 2.0), "expert", names, experts)
               for domain in domains if len(domains) > 1]
    if text:  # a colour per expert, not a scale
        panels.append(("each token's first expert", [[chosen[0] for chosen in row] for row in text["routers"].values()],
                       plt.get_cmap("tab20", len(experts)), (-0.5, len(experts) - 0.5), "token",
                       list(text["routers"]), [repr(t)[1:-1] for t in text["tokens"]]))
    width = max(6.0, 0.35 * len(experts) + 3, 0.22 * len(text["tokens"]) + 3 if text else 0)
    figure, axes = plt.subplots(len(panels), 1, figsize=(width, sum(0.4 * len(p[5]) + 1.4 for p in panels)),
                                squeeze=False)
    for ax, (title, values, colours, (low, high), xlabel, rows, columns) in zip(axes[:, 0], panels):
        image = ax.imshow(values, aspect="auto", cmap=colours, vmin=low, vmax=high)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=90 if xlabel == "token" else 0)
        ax.set_yticks(range(len(rows)), [row.removesuffix(".router") for row in rows], fontsize=7)
        figure.colorbar(image, ax=ax, label="expert" if xlabel == "token" else None)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _log2(value: float | None) -> float:
    import math

    return math.log2(value) if value else float("nan")
