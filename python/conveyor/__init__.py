"""Conveyor: fast LSTM, GRU and RNN layers over truncated-BPTT windows.

The functional API (``lstm_forward``/``lstm_backward`` and the GRU and RNN pairs) runs one window on NumPy
arrays; the layer objects (``LSTM``, ``GRU``, ``RNN``) own PyTorch-compatible parameters. See docs/math.md for
the math and the layouts.
"""

import numbers

from . import _conveyor
from ._functional import (
    GRUGrads,
    LSTMGrads,
    RNNGrads,
    Saved,
    clip_grad_norm,
    dropout_mask,
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    rnn_backward,
    rnn_forward,
)
from ._stack import StackGrads, StackSaved, stack_backward, stack_forward
from .layers import GRU, LSTM, RNN
from .tbptt import TBPTT

__version__ = _conveyor.__version__

__all__ = [
    "GRU",
    "GRUGrads",
    "LSTM",
    "LSTMGrads",
    "RNN",
    "RNNGrads",
    "Saved",
    "StackGrads",
    "StackSaved",
    "TBPTT",
    "__version__",
    "clip_grad_norm",
    "cuda_available",
    "cuda_built",
    "cuda_device_count",
    "cuda_emulated",
    "dropout_mask",
    "gru_backward",
    "gru_forward",
    "lstm_backward",
    "lstm_forward",
    "num_threads",
    "rnn_backward",
    "rnn_forward",
    "set_num_threads",
    "stack_backward",
    "stack_forward",
]


def cuda_built() -> bool:
    """Whether this installation was compiled with the CUDA backend."""
    return _conveyor.cuda_built()


def cuda_available() -> bool:
    """Whether CUDA work can run now: the backend is built, a GPU is present, and a kernel of this build
    runs on it and reproduces the CPU's cell math."""
    return _conveyor.cuda_available()


def cuda_device_count() -> int:
    """The number of CUDA devices visible now (0 without the backend, a driver or a device)."""
    return _conveyor.cuda_device_count()


def cuda_emulated() -> bool:
    """Whether the CUDA backend of this installation is the emulator that runs its kernels on the CPU
    (a test build: ``CMAKE_ARGS=-DCONVEYOR_EMULATE_CUDA=ON``), not a GPU's."""
    return _conveyor.cuda_emulated()


def num_threads() -> int:
    """The size of the CPU backend's worker pool."""
    return _conveyor.num_threads()


def set_num_threads(n: int) -> None:
    """Resizes the CPU backend's worker pool (default: all hardware threads, or CONVEYOR_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an integer number of threads, got {n!r} of type {type(n).__name__}")
    if not 1 <= n <= 1024:
        raise ValueError(f"n: expected a number of threads from 1 to 1024, got {n}")
    _conveyor.set_num_threads(int(n))
