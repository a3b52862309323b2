"""The stage matrix of continual training (data.stages): after stage i ends, L[i][j] = validation
loss on stage j for every seen stage j, and BWT = mean_{j < n} (L[n][j] - L[j][j]) (positive:
forgetting). Rows are kept in `<run.dir>/stages.json` (so a resumed run keeps the earlier ones)
and drawn in `<run.dir>/stages.png`."""
from __future__ import annotations

import json
import os
from pathlib import Path


def backward_transfer(rows: list[list[float]]) -> float | None:
    """BWT after the last row: mean over earlier stages j of L[n][j] - L[j][j]."""
    n = len(rows) - 1
    return sum(rows[n][j] - rows[j][j] for j in range(n)) / n if n >= 1 else None


class StageMatrix:
    def __init__(self, run_dir: Path, names: list[str], enabled: bool):
        self.path, self.names, self.enabled = run_dir / "stages.json", names, enabled
        self.rows: list[list[float]] = json.loads(self.path.read_text())["loss"] if self.path.exists() else []

    def add(self, stage: int, row: list[float]):
        """Record L[stage][0..stage]; returns the BWT so far and, on the rank that writes the
        matrix, its figure (else None)."""
        self.rows = self.rows[:stage] + [row]
        return backward_transfer(self.rows), self._write()

    def rewind(self, step: int, ends: list[int]) -> None:
        """Keep the rows of the stages that ended by step `step` (of those ending at `ends`): a start
        from an earlier checkpoint (after a rollback or a crash, or a branch) has not measured the
        later ones yet, as its metrics.jsonl holds no lines past that checkpoint."""
        ended = sum(end <= step for end in ends)
        if len(self.rows) > ended:
            self.rows = self.rows[:ended]
            self._write()

    def _write(self):
        """The matrix and its figure, on the rank that writes them (returns the figure, else None)."""
        if not self.enabled:
            return None
        if not self.rows:  # no stage measured yet, as at a fresh start
            for path in (self.path, self.path.with_suffix(".png")):
                path.unlink(missing_ok=True)
            return None
        bwt, tmp = backward_transfer(self.rows), self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"stages": self.names, "loss": self.rows, "bwt": bwt}, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash leaves the previous matrix
        figure = self.figure(bwt)
        figure.savefig(self.path.with_suffix(".png"), dpi=100)
        return figure

    def figure(self, bwt: float | None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.names)
        fig, ax = plt.subplots(figsize=(3.2 + 1.0 * n, 1.6 + 0.8 * n))
        grid = [[self.rows[i][j] if i < len(self.rows) and j < len(self.rows[i]) else float("nan")
                 for j in range(n)] for i in range(n)]
        image = ax.imshow(grid, cmap="magma_r")
        for i, row in enumerate(self.rows):
            for j, value in enumerate(row):  # dark text on the light (low-loss) cells
                shade = image.norm(value)
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if shade > 0.5 else "black")
        ax.set_xticks(range(n), self.names, rotation=30, ha="right")
        ax.set_yticks(range(n), [f"after {name}" for name in self.names])
        ax.set_title("validation loss after each stage" + (f"\nBWT {bwt:+.3f}" if bwt is not None else ""),
                     fontsize=10)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        plt.close(fig)
        return fig
