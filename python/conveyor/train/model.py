"""What the tasks' models share: the recurrent layers by name, the array library of a device, dropout masks
keyed by (seed, step), and a scatter-add for embedding gradients."""

from __future__ import annotations

import numpy as np

from .. import _functional, layers
from .errors import UsageError

CELLS = {"lstm": layers.LSTM, "gru": layers.GRU, "rnn": layers.RNN}


def regularisers(cfg) -> dict:
    """The recurrent layer's regularisers from --layer-norm, --weight-dropout, --zoneout and --zoneout-cell,
    as its keyword arguments; the options a cell lacks are refused by flag."""
    if cfg.cell == "rnn" and (cfg.layer_norm or cfg.zoneout):
        flag = "--layer-norm" if cfg.layer_norm else "--zoneout"
        raise UsageError(f"{flag}: an option of --cell lstm and gru, not rnn")
    if cfg.cell != "lstm" and cfg.zoneout_cell:
        raise UsageError(f"--zoneout-cell: an option of --cell lstm, not {cfg.cell}")
    options = {"layer_norm": True} if cfg.layer_norm else {}
    options.update({name: getattr(cfg, name) for name in ("weight_dropout", "zoneout", "zoneout_cell")
                    if getattr(cfg, name)})
    return options


class HeadAndLayer:
    """The parameters of a task's model made of a recurrent layer ``rnn`` and the arrays of ``head`` (a
    dict): ``params()`` by name (the layer's prefixed with ``rnn.``), ``set_params()`` to replace them."""

    def params(self) -> dict:
        return {**self.head, **{f"rnn.{k}": v for k, v in self.rnn.params.items()}}

    def set_params(self, arrays: dict) -> None:
        self.head = {k: arrays[k] for k in self.head}
        self.rnn.params = {k: arrays[f"rnn.{k}"] for k in self.rnn.params}


def xp_for(device: str):
    """NumPy on the CPU; CuPy on the GPU, so that activations never leave the device."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as error:
        raise UsageError("--device: cuda needs CuPy (pip install cupy-cuda12x) and a GPU") from error
    return cupy


def dropout_mask(like, shape, cfg, stream: int, step: int):
    """The inverted-dropout mask of a non-recurrent part (--dropout, --variational) at optimiser step
    ``step``: a pure function of (seed, step, stream), so a resumed run draws the same masks."""
    seed = (cfg.seed * 1_000_003 + step) % 2**64
    return _functional.dropout_mask(like, shape, cfg.dropout, variational=cfg.variational, seed=seed,
                                    mask_stream=stream)


def scatter_add(xp, target, rows, values) -> None:
    if xp is np:
        np.add.at(target, rows, values)
    else:
        import cupyx

        cupyx.scatter_add(target, rows, values)


def to_numpy(a):
    return a if isinstance(a, np.ndarray) else a.get()
