"""A trial's data: the splits it reads, downsampled, noised and tokenized, and the batches drawn from them.

GLUE loading, metrics, tokenization and batching primitives live in `tasks.py`; this module applies a trial's
`data` settings to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader

from kdplatform.config import ResolvedTrial
from kdplatform.distill.tasks import (TASKS, Collator, TaskData, add_label_noise, downsample,
                                      length_grouped_indices, load_split, tokenize)

DATA_SEED = 0  # fixed subsets: dev downsampling, the train-eval subset, and the train subset when "fixed"


def subset_seed(trial: ResolvedTrial, run_seed: int) -> int:
    """The seed of the train downsample and its label noise. `data.subsample_seed: run` draws them with the
    run's seed (CR-ILD's 1k setting draws its subset per seed); "fixed" uses DATA_SEED for every run."""
    return run_seed if trial.data.subsample_seed == "run" else DATA_SEED


@dataclass
class TrialData:
    train: list[dict]
    train_eval: list[dict]
    dev: dict[str, list[dict]]  # "dev" and, for MNLI, "dev_mm"
    supplementary: list[dict]
    collator: Collator
    num_labels: int
    flipped: int = 0
    source_used: str = ""  # where the train split came from: "glue_dir:<folder>", "hub:<id>/<config>", "disk:..."
    train_rows: TaskData | None = None  # the train examples used (downsampled, noised), as text

    @property
    def label_mean(self) -> float | None:
        """The training labels' mean for a regression task (where a new head's output starts), else None."""
        if self.num_labels != 1 or not self.train:
            return None
        return float(np.mean([f["label"] for f in self.train]))


def _with_labels(encodings: list[dict], labels) -> list[dict]:
    return [{**e, "label": y} for e, y in zip(encodings, labels)]


def prepare_data(trial: ResolvedTrial, tokenizer, run_seed: int | None = None) -> TrialData:
    """Load, downsample, add label noise and tokenize (cached) the splits a trial needs. `run_seed`: the seed
    of the run the data is for (the student's seed, or the teacher's for its fine-tune)."""
    spec = TASKS[trial.task]
    d = trial.data
    kw = {"source": d.source, "glue_dir": d.glue_dir, "hub_dataset": d.hub_dataset}
    seed = subset_seed(trial, trial.seed if run_seed is None else run_seed)
    train = downsample(load_split(trial.task, "train", **kw), d.max_train_examples, seed)
    flipped = 0
    if d.label_noise > 0:
        train, flipped = add_label_noise(train, d.label_noise, spec.num_labels, seed)
    tok = lambda data: _with_labels(tokenize(data, tokenizer, d.max_seq_length), data.labels)  # noqa: E731
    train_feats = tok(train)
    eval_idx = np.random.default_rng(DATA_SEED).permutation(len(train_feats))[:d.train_eval_examples]
    dev = {s: tok(downsample(load_split(trial.task, s, **kw), d.max_dev_examples, DATA_SEED))
           for s in spec.dev_splits}
    supplementary: list[dict] = []
    for extra in d.supplementary_tasks:
        data = downsample(load_split(extra, "train", **kw), d.supplementary_examples, DATA_SEED)
        supplementary += [{**e, "label": 0.0 if spec.is_regression else 0}
                          for e in tokenize(data, tokenizer, d.max_seq_length)]
    return TrialData(train_feats, [train_feats[i] for i in sorted(eval_idx)], dev, supplementary,
                     Collator(tokenizer.pad_token_id, spec.is_regression), spec.num_labels, flipped,
                     train.origin, train)


def train_loader(features: list[dict], batch_size: int, collator: Collator, seed: int) -> DataLoader:
    """Length-grouped shuffled batches (similar lengths pad less), reproducible from `seed`."""
    order = length_grouped_indices([len(f["input_ids"]) for f in features], batch_size, seed)
    # `idx` (position in `features`) travels with each example: it is the teacher output cache's row
    return DataLoader([{**features[i], "idx": i} for i in order], batch_size=batch_size, shuffle=False,
                      collate_fn=collator)


def eval_loader(features: list[dict], batch_size: int, collator: Collator) -> DataLoader:
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return DataLoader([{**features[i], "idx": i} for i in order], batch_size=batch_size, collate_fn=collator)
