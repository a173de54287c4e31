"""Arrays of other libraries: CuPy, PyTorch and JAX (any array with ``__dlpack__``), on the CPU or a GPU, and
any other library whose arrays follow the Python array API standard (``__array_namespace__``).

The compiled core reads and writes such arrays in place through DLPack. This module does the three things
that need the array's own library: it allocates outputs of the same kind and device as ``x``, of x's dtype
or of the one the core names (float32 for the LSTM's cell state beside 16-bit ``x``); it finds
the stream to run on (the library's current stream on x's device, unless the caller names one); and it hands
JAX its outputs back as JAX arrays.
"""

from __future__ import annotations

import numpy as np

from . import _conveyor

_DLPACK_CPU = 1
_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_foreign(a) -> bool:
    """Whether ``a`` is an array of another library (anything with ``__dlpack__`` that is not NumPy)."""
    return a is not None and not isinstance(a, np.ndarray) and hasattr(a, "__dlpack__")


def any_foreign(*arrays) -> bool:
    """Whether any of ``arrays`` (None entries allowed) is foreign: a plain loop, as a small call asks it of a
    dozen arrays per window."""
    for a in arrays:
        if a is not None and type(a) is not np.ndarray and is_foreign(a):
            return True
    return False


def library_of(a) -> str:
    return type(a).__module__.split(".")[0]


def _is_torch(a) -> bool:
    return library_of(a) == "torch"


_DTYPE_NAMES = {}  # dtype -> name: NumPy's dtype.name costs microseconds, and every call asks a dozen times


def lengths_argument(lengths):
    """`lengths` as the core takes it: None; an array of another library (CuPy, PyTorch, JAX; on the CPU or
    x's device) as it is, for DLPack; anything else as a NumPy array, of int64 if of integers. The core checks
    its dtype (int32 or int64), shape and values against the window."""
    if lengths is None or is_foreign(lengths):
        return lengths
    array = np.asarray(lengths)
    if array.dtype.kind in "iu" and array.dtype != np.int32:
        if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"lengths: expected lengths in [1, T], got {int(array.max())}")
        array = array.astype(np.int64)
    return np.ascontiguousarray(array)


def dtype_name(dtype) -> str:
    """The name of a NumPy, CuPy, JAX, PyTorch or array-API dtype: "float32", "bfloat16", ..."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object
        pass
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype).rsplit(".", 1)[-1]  # torch.float16, array_api_strict.float32
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


# The dtype of the LSTM's cell-state arrays (c0, c_T, dc_T, dc0) where it is not x's (conveyor.h,
# cell_state_dtype): the CUDA backend keeps the cell state in float32 beside 16-bit storage.
_CELL_STATE_DTYPES = {"float16": "float32", "bfloat16": "float32"}


def cell_state_dtype_name(x_dtype) -> str:
    """The name of the cell-state dtype for x of ``x_dtype``: "float32" for float16 and bfloat16 x, else
    x's own."""
    name = dtype_name(x_dtype)
    return _CELL_STATE_DTYPES.get(name, name)


def for_export(a):
    """``a``, ready for ``__dlpack__``: PyTorch refuses to export a tensor that requires grad, so such a
    tensor is detached (a view of the same memory, not a copy)."""
    if _is_torch(a) and getattr(a, "requires_grad", False):
        return a.detach()
    return a


def _on_cuda(a) -> bool:
    return a.__dlpack_device__()[0] in _DLPACK_CUDA_DEVICES


def stream_of(x, stream) -> int:
    """The cudaStream_t (as an int) to run on: ``stream`` when given (an int, or a CuPy or PyTorch stream),
    else the current stream of x's library on x's device, else 0 (the legacy default stream)."""
    if stream is not None:
        if isinstance(stream, (bool, np.bool_)):
            raise TypeError(f"stream: expected a CUDA stream (an int, a cupy or torch stream), "
                            f"got {stream!r}")
        for attribute in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            if hasattr(stream, attribute):
                return int(getattr(stream, attribute))
        if isinstance(stream, (int, np.integer)):
            if stream < 0:
                raise ValueError(f"stream: expected a cudaStream_t handle (>= 0), got {stream}")
            return int(stream)
        raise TypeError(f"stream: expected a CUDA stream (an int, a cupy or torch stream), got "
                        f"{type(stream).__name__}")
    if not is_foreign(x) or not _on_cuda(x):
        return 0
    library = library_of(x)
    if library == "torch":
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(x.device.id):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


class Allocator:
    """Allocates outputs like ``x``: same library and device, and x's dtype or the one named by the call,
    ``allocate(shape, "float32")`` (the compiled core asks for the LSTM's c_T and dc0 so). NaN-filled when
    the tests ask for it."""

    def __init__(self, x):
        self._x = x
        self._library = library_of(x) if is_foreign(x) else "numpy"
        if self._library not in ("numpy", "torch", "cupy", "jax", "jaxlib"):
            if not hasattr(x, "__array_namespace__"):
                raise TypeError(f"x: Conveyor reads any array with __dlpack__, but makes its outputs with "
                                f"NumPy, CuPy, PyTorch, JAX or the array API (__array_namespace__); got a "
                                f"{type(x).__module__}.{type(x).__name__}")
            self._library = "array-api"
        self._poison = _conveyor._poison_outputs()

    def __call__(self, shape, dtype=None):
        """A new array of ``shape``, of x's dtype, or of the dtype named ``dtype`` ("float32", "float64",
        "float16", "bfloat16")."""
        if dtype is not None and dtype == dtype_name(self._x.dtype):
            dtype = None
        if self._library == "array-api":
            xp, x = self._x.__array_namespace__(), self._x
            # The standard's namespaces name their dtypes (xp.float32); one without them takes the name.
            dt = x.dtype if dtype is None else getattr(xp, dtype, dtype)
            if self._poison:
                return xp.full(tuple(shape), float("nan"), dtype=dt, device=x.device)
            return xp.empty(tuple(shape), dtype=dt, device=x.device)
        out = self._empty(tuple(shape), dtype)
        if self._poison:
            if hasattr(out, "fill_"):
                out.fill_(float("nan"))
            else:
                out.fill(float("nan"))
        return out

    def _empty(self, shape, dtype):
        x = self._x
        if self._library == "numpy":
            return np.empty(shape, dtype=x.dtype if dtype is None else dtype)
        if self._library == "torch":
            import torch

            return torch.empty(shape, dtype=x.dtype if dtype is None else getattr(torch, dtype),
                               device=x.device)
        if self._library == "cupy":
            import cupy

            with cupy.cuda.Device(x.device.id):
                return cupy.empty(shape, dtype=x.dtype if dtype is None else dtype)
        return _empty_for_jax(x, shape, dtype)

    def finish(self, outputs):
        """The outputs as the caller's library holds them (JAX arrays for JAX input)."""
        if self._library not in ("jax", "jaxlib"):
            return outputs
        import jax.dlpack

        return tuple(None if o is None else jax.dlpack.from_dlpack(o) for o in outputs)


def _empty_for_jax(x, shape, dtype=None):
    # JAX arrays are immutable, so outputs for JAX input are made by PyTorch or CuPy (whichever is
    # installed) on x's device and handed to JAX through DLPack afterwards, without a copy.
    device_type, device_id = x.__dlpack_device__()
    dtype = dtype_name(x.dtype) if dtype is None else dtype
    try:
        import torch

        device = f"cuda:{device_id}" if device_type in _DLPACK_CUDA_DEVICES else "cpu"
        return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    except ImportError:
        pass
    if device_type in _DLPACK_CUDA_DEVICES and dtype != "bfloat16":
        try:
            import cupy

            with cupy.cuda.Device(device_id):
                return cupy.empty(shape, dtype=dtype)
        except ImportError:
            pass
    if device_type == _DLPACK_CPU and dtype != "bfloat16":
        return np.empty(shape, dtype=dtype)
    raise TypeError("x: JAX input needs PyTorch or CuPy installed to allocate Conveyor's outputs on its "
                    "device")
