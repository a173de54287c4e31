"""A minimal CUDA array for the test suites: memory from the CUDA runtime Conveyor was built with (a GPU's,
or the emulator's in a CONVEYOR_EMULATE_CUDA build), handed to Conveyor through DLPack like a CuPy or
PyTorch CUDA tensor, and made by Conveyor's allocator through the array API's ``empty`` and ``full``. It
needs neither CuPy nor PyTorch, so the same CUDA tests run on a GPU and in the emulated build.

Only what the tests need: ``DeviceArray.from_numpy(a, dtype)``, ``.numpy()`` (float64 for bfloat16, which
NumPy lacks), ``.T`` of a matrix (a strided view), shapes, dtypes and DLPack. Copies to and from the host
wait for the device, as cudaMemcpy does.
"""

from __future__ import annotations

import ctypes

import numpy as np

from conveyor import _conveyor

_KDLCUDA = 2
# DLPack type codes and bits of the dtypes the tests use; bfloat16 is stored as its 16 bits (uint16 here).
_DLPACK_TYPES = {"float32": (2, 32), "float64": (2, 64), "float16": (2, 16), "bfloat16": (4, 16),
                 "int32": (0, 32)}
_HOST_TYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
               "int32": np.int32}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float values rounded to bfloat16 (to nearest, ties to even), as their 16 bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


class _Memory:
    """One cudaMalloc'd buffer, freed when the last array viewing it goes."""

    def __init__(self, nbytes: int, device: int):
        self.device = device
        self.address = _conveyor._device_malloc(device, max(nbytes, 1))

    def __del__(self):
        try:
            _conveyor._device_free(self.device, self.address)
        except RuntimeError:  # a faulted device (sticky error) cannot free; the process is done with it
            pass


class DeviceArray:
    def __init__(self, shape, dtype: str, device: int = 0, *, _memory=None, _strides=None):
        dtype = np.dtype(dtype).name if dtype != "bfloat16" else "bfloat16"
        if dtype not in _DLPACK_TYPES:
            raise TypeError(f"DeviceArray: unsupported dtype {dtype}")
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self.device = device
        self.itemsize = _DLPACK_TYPES[dtype][1] // 8
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self._memory = _memory or _Memory(self.size * self.itemsize, device)
        contiguous = tuple(int(np.prod(self.shape[d + 1:], dtype=np.int64)) for d in range(len(self.shape)))
        self.strides = tuple(_strides) if _strides is not None else contiguous  # in elements
        self._managed = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_numpy(cls, a, dtype: str, device: int = 0) -> DeviceArray:
        a = np.asarray(a)
        out = cls(a.shape, dtype, device)
        if out.dtype == "bfloat16":
            host = _bfloat16_bits(a)
        else:
            host = np.ascontiguousarray(a, _HOST_TYPES[out.dtype])
        if out.size:
            _conveyor._copy_to_device(device, out._memory.address, host)
        return out

    def numpy(self) -> np.ndarray:
        """A host copy; bfloat16 comes back as float64."""
        if self.strides != DeviceArray(self.shape, self.dtype, self.device, _memory=self._memory).strides:
            raise ValueError("DeviceArray.numpy: copy back a contiguous array")
        host = np.empty(self.shape, _HOST_TYPES[self.dtype])
        if self.size:
            _conveyor._copy_to_host(self.device, host, self._memory.address)
        if self.dtype == "bfloat16":
            return (host.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return host

    @property
    def T(self) -> DeviceArray:  # noqa: N802 (NumPy's name)
        if self.ndim != 2:
            raise ValueError("DeviceArray.T: a matrix only")
        return DeviceArray(self.shape[::-1], self.dtype, self.device, _memory=self._memory,
                           _strides=self.strides[::-1])

    def reshape(self, *shape) -> DeviceArray:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return DeviceArray(shape, self.dtype, self.device, _memory=self._memory)

    def astype(self, dtype: str) -> DeviceArray:
        """A converted copy (through the host)."""
        return DeviceArray.from_numpy(self.numpy(), dtype, self.device)

    # DLPack
    def __dlpack_device__(self):
        return (_KDLCUDA, self.device)

    def __dlpack__(self, stream=None, **_):
        # Every copy into this memory waited for the device, so it is ready on any stream.
        if self._managed is None:
            code, bits = _DLPACK_TYPES[self.dtype]
            self._shape = (ctypes.c_int64 * max(self.ndim, 1))(*self.shape)
            self._strides = (ctypes.c_int64 * max(self.ndim, 1))(*self.strides)
            managed = _DLManagedTensor()
            managed.dl_tensor = _DLTensor(self._memory.address, _DLDevice(_KDLCUDA, self.device), self.ndim,
                                          _DLDataType(code, bits, 1), self._shape, self._strides, 0)
            managed.manager_ctx = None
            managed.deleter = None  # the array outlives the call that reads it; nothing to release
            self._managed = managed
        return _capsule_new(ctypes.addressof(self._managed), b"dltensor", None)

    # The array API's constructors, which Conveyor's allocator uses for outputs.
    def __array_namespace__(self, api_version=None):
        return _namespace

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device=cuda:{self.device})"


class _Namespace:
    @staticmethod
    def empty(shape, dtype, device=0):
        return DeviceArray(shape, dtype, device)

    @staticmethod
    def full(shape, fill_value, dtype, device=0):
        return DeviceArray.from_numpy(np.full(shape, fill_value), dtype, device)


_namespace = _Namespace()


def stream_create(device: int = 0) -> int:
    """A new CUDA stream of the runtime Conveyor was built with, as an int handle."""
    return _conveyor._stream_create(device)


def stream_destroy(stream: int, device: int = 0) -> None:
    _conveyor._stream_destroy(device, stream)


def synchronize(stream: int = 0, device: int = 0) -> None:
    _conveyor._synchronize(device, stream)
