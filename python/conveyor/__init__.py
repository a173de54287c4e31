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
    "share_openmp_threads",
    "sharing_openmp_threads",
    "stack_backward",
    "stack_forward",
    "use_amx",
    "using_amx",
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


def share_openmp_threads(share: bool = True) -> bool:
    """Runs the CPU backend's parallel work on the threads of the GNU OpenMP runtime (libgomp) that another
    library of this process has loaded (PyTorch's CPU build does), ``num_threads()`` of them, instead of on
    Conveyor's own pool; ``share=False`` goes back to the pool. Returns whether the runtime was found (where
    it was not, nothing changes). ``import conveyor.torch`` turns it on.

    Why: after each of its parallel regions an OpenMP runtime's threads wait spinning on their cores for some
    milliseconds, and a pool of Conveyor's started right after shares a core with them (LSTM T=64, B=32,
    H=256 on 2 threads: 10.4-10.9 ms a forward right after a torch.nn call against 8.2-8.5 on torch's
    threads). On the same threads, each library's work runs in turn. A call that starts while the runtime's
    threads are asleep (after idle time) runs on the own pool instead: a parallel region waits for every
    thread of its team, and a sleeping one took from 0.5 to 13 ms to join (``bench/openmp_threads.py``).
    Results are the same bits on either."""
    if not isinstance(share, bool):
        raise TypeError(f"share: expected True or False, got {share!r} of type {type(share).__name__}")
    return _conveyor.share_openmp_threads(share)


def sharing_openmp_threads() -> bool:
    """Whether the CPU backend runs on a loaded OpenMP runtime's threads (``share_openmp_threads``)."""
    return _conveyor.sharing_openmp_threads()


def use_amx(on: bool = True) -> bool:
    """Runs the CPU backend's float32 matrix products of at least 128 columns and a depth of 128 on the
    processor's AMX tiles (Intel Xeon, Sapphire Rapids and later), or (``on=False``) on its AVX-512 units.
    On by default where the processor has AMX; ``CONVEYOR_CPU_AMX=0`` in the environment turns it off.
    Returns the previous setting; where there is no AMX, nothing changes.

    Each float is split into three bfloat16 parts whose sum is the float exactly, and the six largest of the
    nine part products are summed in float32: float32's accuracy (worst errors against float64 of the same
    order as the AVX-512 products', ``bench/cpu_gemm``) at 1.1-1.6 times their speed on a recurrent layer's
    shapes. The bits differ from the AVX-512 products'; within either, every path and batch gives the same."""
    if not isinstance(on, bool):
        raise TypeError(f"on: expected True or False, got {on!r} of type {type(on).__name__}")
    return _conveyor.use_amx(on)


def using_amx() -> bool:
    """Whether the CPU backend's float32 products run on AMX tiles (``use_amx``)."""
    return _conveyor.using_amx()
