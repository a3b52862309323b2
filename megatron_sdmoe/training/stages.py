"""Training data in stages (docs/methods.md section 4).

Without `data.stages` a run is one stage over `data.path`. With them, stage i trains on its own
blend for its step budget; after it ends, every seen stage's validation data is evaluated into the
stage matrix (stage_matrix.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from torch.utils.data import Dataset

from megatron_sdmoe.config import Config, stage_name
from megatron_sdmoe.data.datasets import build_datasets, parse_blend
from megatron_sdmoe.data.tokenizer import Tokenizer
from megatron_sdmoe.training.batches import BatchSchedule


@dataclass
class Stage:
    name: str
    first_step: int
    steps: int
    train: Dataset
    valid: Dataset | None
    test: Dataset | None  # evaluated when the run reaches train.max_steps (the last stage's)
    domains: list[str]  # the validation blend's datasets, in the order of their dataset ids
    test_domains: list[str]  # the test blend's

    @property
    def last_step(self) -> int:  # 1-based step count at which the stage ends
        return self.first_step + self.steps


def domain_names(path: list) -> list[str]:
    """Names of a blend's datasets: their prefixes' file names (the sample corpus: `sample`)."""
    if not path:
        return ["sample"]
    names = [os.path.basename(prefix) for prefix in parse_blend(path)[0]]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


class StageBlends(NamedTuple):
    name: str
    section: str  # the config section the blends are set in: data, or data.stages[i]
    path: list
    valid_path: list
    test_path: list
    steps: int
    samples: int  # the sequences its steps train on


def stage_blends(cfg: Config) -> list[StageBlends]:
    """The blends of each stage; without data.stages, one stage over data.path."""
    blends = ([(stage_name(cfg, i), f"data.stages[{i}]", s.path, s.valid_path, s.test_path, s.steps)
               for i, s in enumerate(cfg.data.stages)]
              or [("main", "data", cfg.data.path, cfg.data.valid_path, cfg.data.test_path, cfg.train.max_steps)])
    batches, first, stages = BatchSchedule(cfg), 0, []
    for *blend, steps in blends:
        stages.append(StageBlends(*blend, steps, batches.first_sample(first + steps) - batches.first_sample(first)))
        first += steps
    return stages


def build_stages(cfg: Config, tokenizer: Tokenizer) -> list[Stage]:
    stages, first = [], 0
    for index, (name, section, path, valid_path, test_path, steps, samples) in enumerate(stage_blends(cfg)):
        splits = build_datasets(cfg, tokenizer, samples, cfg.train.eval_samples, path, valid_path, test_path,
                                section, index)
        stages.append(Stage(name, first, steps, *splits, domain_names(valid_path or path),
                            domain_names(test_path or path)))
        first += steps
    return stages


def evaluated_on_training_data(cfg: Config) -> list[str]:
    """A note for each separate validation or test blend that holds a file its stage trains on
    (whole, with a separate validation blend): its losses there are measured on training documents,
    which may be meant (a check of overfitting) or a slip."""
    notes = []
    for name, _section, path, valid_path, test_path, *_ in stage_blends(cfg):
        trained = set(parse_blend(path)[0]) if path else set()
        for setting, blend in (("valid_path", valid_path), ("test_path", test_path)):
            shared = [prefix for prefix in parse_blend(blend)[0] if prefix in trained] if blend else []
            if shared:
                notes.append(f"note: the {setting} blend of stage {name} holds {', '.join(shared)}, which the stage "
                             "trains on: its losses there are measured on training documents")
    return notes
