"""``conveyor train``, ``conveyor sample`` and ``conveyor eval``: recurrent models trained with Conveyor's
layers. Each task supplies its data and its head (``language``: character- and word-level language models;
``music``: next-frame prediction of piano rolls; ``classify``: text classification with a bidirectional
layer); one loop (``loop``), one optimiser module (``optim``), one checkpoint format (``checkpoint``) and one
progress display (``progress``) serve them all."""

from __future__ import annotations

from . import checkpoint
from .classify import ClassifyTask
from .config import Config
from .errors import UsageError
from .language import LanguageTask, load_corpus, streams
from .loop import Task, Trainer, run
from .music import MusicTask

TASKS = {task.name: task for task in (LanguageTask, MusicTask, ClassifyTask)}


def build(cfg: Config, record: dict | None = None) -> Task:
    """The task of ``cfg`` (its defaults filled in); ``record``: a checkpoint's task record (vocabulary,
    labels) to rebuild the same model."""
    cls = TASKS[cfg.task]
    cfg = cls.defaults(cfg)
    return cls(cfg) if record is None else cls.from_checkpoint(cfg, record)


__all__ = ["TASKS", "ClassifyTask", "Config", "LanguageTask", "MusicTask", "Task", "Trainer", "UsageError",
           "build", "checkpoint", "load_corpus", "run", "streams"]
