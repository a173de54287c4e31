"""Conveyor's compiled core (csrc/bindings/module.cpp): the C++ API over NumPy arrays, and over any array
that exports DLPack (CuPy, PyTorch, JAX) through the *_dlpack functions.

Use the functions of the `conveyor` package; these check less about their Python arguments.
"""

from typing import Any, Callable

import numpy as np

__version__: str

def forward(
    cell: str,
    options: dict[str, object],
    x: np.ndarray,
    W: np.ndarray,
    R: np.ndarray,
    bW: np.ndarray | None,
    bR: np.ndarray | None,
    h0: np.ndarray | None,
    c0: np.ndarray | None,
    P: np.ndarray | None,
    lengths: np.ndarray | None,
    packed: bool,
    training: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(y, h_T, c_T or None, cache or None)."""

def backward(
    cell: str,
    options: dict[str, object],
    x: np.ndarray,
    W: np.ndarray,
    R: np.ndarray,
    h0: np.ndarray | None,
    c0: np.ndarray | None,
    P: np.ndarray | None,
    y: np.ndarray,
    cache: np.ndarray | None,
    dy: np.ndarray,
    dh_T: np.ndarray | None,
    dc_T: np.ndarray | None,
    lengths: np.ndarray | None,
    packed: bool,
    has_bW: bool,
    has_bR: bool,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray | None,
    np.ndarray,
    np.ndarray,
    np.ndarray | None,
    np.ndarray | None,
    np.ndarray | None,
]:
    """(dx, dh0, dc0 or None, dW, dR, dbW or None, dbR or None, dP or None)."""

def forward_dlpack(
    cell: str,
    options: dict[str, object],
    x: Any,
    W: Any,
    R: Any,
    bW: Any | None,
    bR: Any | None,
    h0: Any | None,
    c0: Any | None,
    P: Any | None,
    lengths: Any | None,
    packed: bool,
    training: bool,
    allocate: Callable[[tuple[int, ...], str], Any],
    stream: int,
) -> tuple[Any, Any, Any | None, Any | None]:
    """forward() for arrays with __dlpack__; outputs come from allocate(shape, dtype_name): x's dtype, but
    float32 for the LSTM's c_T beside float16 or bfloat16 x."""

def backward_dlpack(
    cell: str,
    options: dict[str, object],
    x: Any,
    W: Any,
    R: Any,
    h0: Any | None,
    c0: Any | None,
    P: Any | None,
    y: Any,
    cache: Any | None,
    dy: Any,
    dh_T: Any | None,
    dc_T: Any | None,
    lengths: Any | None,
    packed: bool,
    has_bW: bool,
    has_bR: bool,
    allocate: Callable[[tuple[int, ...], str], Any],
    stream: int,
) -> tuple[Any, Any, Any | None, Any, Any, Any | None, Any | None, Any | None]:
    """backward() for arrays with __dlpack__; outputs come from allocate(shape, dtype_name): x's dtype, but
    float32 for the LSTM's dc0 beside float16 or bfloat16 x."""

def gate_count(cell: str, options: dict[str, object] = ...) -> int: ...
def dropout_mask(p: float, variational: bool, seed: int, mask_stream: int, out: Any, stream: int) -> Any: ...
def cuda_built() -> bool: ...
def cuda_available() -> bool: ...
def cuda_device_count() -> int: ...
def cuda_emulated() -> bool: ...
def _device_malloc(device: int, nbytes: int) -> int: ...
def _device_free(device: int, address: int) -> None: ...
def _copy_to_device(device: int, address: int, host: Any) -> None: ...
def _copy_to_host(device: int, host: Any, address: int) -> None: ...
def _stream_create(device: int) -> int: ...
def _stream_destroy(device: int, stream: int) -> None: ...
def _synchronize(device: int, stream: int = ...) -> None: ...
def _pool_release_threshold(device: int) -> int: ...
def _persistent_floor(
    steps: int, batch: int, hidden: int, dtype_name: str, stream: int, cell: str = ..., direction: str = ...
) -> dict[str, int]: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def share_openmp_threads(share: bool = ...) -> bool: ...
def sharing_openmp_threads() -> bool: ...
def _last_parallel_runtime() -> str: ...
def _set_check_openmp_team(check: bool) -> None: ...
def _set_poison_outputs(on: bool) -> None: ...
def _poison_outputs() -> bool: ...
