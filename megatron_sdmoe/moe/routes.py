"""Which tokens each expert takes (`sdmoe-eval --routes`).

Over the validation tokens a checkpoint is evaluated on, every MoE router's choices are counted
per (source dataset, token id): RouteComposition's hooks with each token labelled by its id
instead of its domain. Then, per expert of each router:
- load: its share of the router's routings (rows x k, fewer where a capacity drops tokens);
- top tokens: the tokens it takes most often, as a share of the token's rows that could reach it
  (1.0: every one does), among tokens with at least `min_count` rows: OLMoE's token specialisation
  (arXiv 2409.02060, section 5). A row is a token, or under head-wise routing a head's sub-token,
  which can reach only its head's bank of experts with per-head banks; `rows` counts the token's
  rows that could reach the expert;
- with a blend, each source dataset's lift: its share of the expert's rows over its share of all
  rows (1.0: no preference).
Per router, `token_concentration`: the row-weighted mean over tokens of their largest share, to
set against k / (experts in a bank), what routing that ignores the token gives.
"""
from __future__ import annotations

from collections import Counter

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sdmoe.moe.composition import RouteComposition


class RouteTokens(RouteComposition):
    """Counts routes per (source dataset, token id): label = domain x vocab_size + token."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        super().__init__(model)
        self.vocab_size = vocab_size
        self.names = [name for name, m in model.named_modules() if isinstance(m, TopKRouter)]

    def position_labels(self, positions: torch.Tensor, seq_length: int) -> torch.Tensor:
        tokens = self.batch["tokens"].cpu()[:, positions]  # [b, len(positions)]
        return self.batch["domain"].cpu()[None, :] * self.vocab_size + tokens.T

    def report(self, domains: list[str], decode, top: int, min_count: int) -> list[dict]:
        """Per router: the statistics above (a collective: every rank's counts are summed)."""
        return [router_report(name, counts, router.weight.shape[0], getattr(router, "banks", 1), router.topk,
                              self.vocab_size, domains, decode, top, min_count)
                for name, router, counts in zip(self.names, self.routers, self.gathered())]


def experts_in(route: tuple[int, ...]) -> list[int]:
    """The experts of a route id (composition.route_ids: 63 experts per word)."""
    return [word_index * 63 + bit for word_index, word in enumerate(route) for bit in range(63) if word >> bit & 1]


def router_report(name: str, counts: Counter, num_experts: int, banks: int, topk: int, vocab_size: int,
                  domains: list[str], decode, top: int, min_count: int) -> dict:
    """`counts`: {(route, domain x vocab_size + token): rows}; `decode`: token id -> text."""
    ids = sorted({label % vocab_size for _route, label in counts})  # the tokens seen: columns
    column = {token: i for i, token in enumerate(ids)}
    reaching = torch.zeros(num_experts, len(domains), len(ids), dtype=torch.float64)  # rows reaching expert e
    rows = torch.zeros(len(domains), len(ids), dtype=torch.float64)
    for (route, label), n in counts.items():
        domain, token = divmod(label, vocab_size)
        rows[domain, column[token]] += n
        for expert in experts_in(route):
            reaching[expert, domain, column[token]] += n
    token_rows, token_reaching = rows.sum(0), reaching.sum(1)  # [tokens], [E, tokens]
    eligible = token_rows / banks  # a token's rows that can reach an expert (per-head banks: one head's)
    share = token_reaching / eligible  # [E, tokens]
    total = token_rows.sum().item()
    seen = eligible >= min_count
    by_rows = token_rows.argsort(descending=True, stable=True)  # ties in share: the commoner token first
    experts = []
    for e in range(num_experts):
        ranked = by_rows[torch.where(seen, share[e], -1.0)[by_rows].argsort(descending=True, stable=True)][:top]
        entry = {"expert": e, "load": token_reaching[e].sum().item() / token_reaching.sum().item(),
                 "top_tokens": [{"id": ids[t], "text": decode(ids[t]), "share": share[e, t].item(),
                                 "rows": int(eligible[t].item())} for t in ranked.tolist() if seen[t]]}
        if len(domains) > 1:
            expert_rows = reaching[e].sum().item()
            entry["domain_lift"] = {domain: (reaching[e, d].sum().item() / expert_rows) / (rows[d].sum().item() / total)
                                    if expert_rows and rows[d].sum() else None for d, domain in enumerate(domains)}
        experts.append(entry)
    concentration = (token_rows * share.max(0).values).sum().item() / total
    return {"router": name, "experts": num_experts, "banks": banks, "topk": topk, "rows": int(total),
            "token_concentration": concentration, "uniform_concentration": topk * banks / num_experts,
            "per_expert": experts}


def report_lines(layers: list[dict]) -> list[str]:
    lines = []
    for layer in layers:
        banks = f" in {layer['banks']} banks" if layer["banks"] > 1 else ""
        lines.append(f"{layer['router']} ({layer['experts']} experts{banks}, top-{layer['topk']}, {layer['rows']:,} rows): "
                     f"token concentration {layer['token_concentration']:.3f} (routing blind to the token: "
                     f"{layer['uniform_concentration']:.3f})")
        for entry in layer["per_expert"]:
            lift = "".join(f" {domain} {_number(x)}" for domain, x in entry.get("domain_lift", {}).items())
            tokens = ", ".join(f"{t['text']!r} {t['share']:.2f} ({t['rows']})" for t in entry["top_tokens"])
            lines.append(f"  expert {entry['expert']:>3}  load {entry['load']:6.1%}"
                         + (f"  lift{lift}" if lift else "") + f"  {tokens}")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(layers: list[dict], domains: list[str], path) -> None:
    """Routers x experts heatmaps: the load, and with a blend each source dataset's lift (log2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("load (share of routings)", [[e["load"] for e in layer["per_expert"]] for layer in layers], "viridis",
               None)]
    if len(domains) > 1:
        panels += [(f"{domain}: log2 lift", [[_log2(e["domain_lift"][domain]) for e in layer["per_expert"]]
                                            for layer in layers], "coolwarm", 2.0) for domain in domains]
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.35 * layers[0]["experts"] + 3),
                                                          (0.4 * len(layers) + 1.2) * len(panels)), squeeze=False)
    for ax, (title, values, colours, bound) in zip(axes[:, 0], panels):
        image = ax.imshow(values, aspect="auto", cmap=colours, vmin=-bound if bound else None, vmax=bound)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [layer["router"].removesuffix(".router") for layer in layers], fontsize=7)
        figure.colorbar(image, ax=ax)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _log2(value: float | None) -> float:
    import math

    return math.log2(value) if value else float("nan")
