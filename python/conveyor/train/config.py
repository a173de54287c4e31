"""The configuration of a training run: every option of ``conveyor train``, one flat record that a checkpoint
stores whole. Options left as None take the task's defaults (``Task.defaults``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Config:
    task: str = "lm"
    data: str | None = None          # absolute path; None: the task's bundled data
    cell: str = "lstm"
    layers: int | None = None
    hidden: int | None = None
    embedding: int | None = None     # lm, classify
    level: str = "char"              # lm
    tie: bool = False                # lm
    dropout: float = 0.0
    variational: bool = False
    layer_norm: bool = False         # the recurrent layers' regularisers (docs/math.md, "Regularisers")
    weight_dropout: float = 0.0
    zoneout: float = 0.0
    zoneout_cell: float = 0.0
    batch: int | None = None
    k1: int = 64                     # lm: TBPTT k1 (--bptt) and k2 (--bptt2)
    k2: int | None = None
    reset_at: str | None = None      # lm: a token that ends a document; the state restarts after it
    max_length: int | None = None    # classify: longer texts keep their first max_length words
    vocabulary: int | None = None    # classify: the most frequent words kept, the rest <unk>
    optimizer: str = "adam"
    lr: float | None = None
    lr_decay: float = 1.0
    decay_after: int = 0
    clip: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    minutes: float | None = None
    eval_every: int | None = None    # 0: only at the end; None: the task's default
    eval_batch: int = 16
    keep_best: bool | None = None    # early stopping: report the test figure of the best validation
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def with_defaults(self, **defaults) -> Config:
        """This configuration with each option still None set to its value in ``defaults``."""
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Options that only decide when a run stops, how often it reports and where it writes: a resumed run may
# change them. Every other option shapes the numbers of the run and must match the checkpoint.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "minutes", "eval_every", "eval_batch", "device",
                               "keep_best"})
