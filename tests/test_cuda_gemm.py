"""The CUDA backend's time-parallel products (cuda/gemm.cu) through their test entry point,
conveyor._conveyor._gemm, which bench/gemm.py times: both kinds the backend forms (the projection x W^T, in
the storage type to the compute type; the gradients dx, dW and dR, a compute-type A times a storage-type B
into the storage type), every storage type, both layouts of A and B, accumulation and TF32, against float64
NumPy on the same rounded inputs. Shapes straddle the kernels' tiles (64 x 64 outputs, K slices of 16 and
32). Runs on a GPU and in the emulated build (CONVEYOR_EMULATE_CUDA), whose device reports compute capability
9.0, so the tensor-core kernel runs there too."""

import numpy as np
import pytest
from device_arrays import DeviceArray

from conveyor import _conveyor

pytestmark = pytest.mark.cuda

COMPUTE = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}

# |C - A B| <= bound (|A| |B|) element-wise, by (dtype, kind, TF32): the multiply type's rounding of the
# operands the kernel rounds (none for storage-type operands, which every multiply type holds exactly; a float
# A rounds to TF32 beside float16 and to bfloat16 beside bfloat16), float accumulation over K, and the
# output's rounding where it is in the storage type.
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "tf32": 2.0 ** -11, "float16": 2.0 ** -11,
                 "bfloat16": 2.0 ** -8}


def relative_bound(dtype, kind, tf32, K):
    accumulate = (K + 2) * UNIT_ROUNDOFF[COMPUTE[dtype]]
    if dtype == "float32" and tf32:
        return 2 * UNIT_ROUNDOFF["tf32"] + accumulate
    if kind == "gradient" and dtype in ("float16", "bfloat16"):
        return 2 * UNIT_ROUNDOFF[dtype] + accumulate  # A's rounding and the output's
    return accumulate


def operand(rng, rows, cols, dtype, transposed):
    """A device matrix [rows, cols] (stored transposed when asked) and its rounded values as float64."""
    stored = rng.uniform(-1, 1, (cols, rows) if transposed else (rows, cols))
    device = DeviceArray.from_numpy(stored, dtype)
    values = device.numpy().astype(np.float64)
    return device, values.T if transposed else values


def run_gemm(kind, dtype, M, N, K, rng, *, a_transposed=False, b_transposed=False, accumulate=False,
             tf32=False):
    """The product on the device, the float64 product of the same rounded inputs, and |A| |B|."""
    a_type, c_type = (dtype, COMPUTE[dtype]) if kind == "projection" else (COMPUTE[dtype], dtype)
    a, A = operand(rng, M, K, a_type, a_transposed)
    b, B = operand(rng, K, N, dtype, b_transposed)
    start = rng.uniform(-1, 1, (M, N)) if accumulate else np.full((M, N), np.nan)  # NaN: poisoned output
    c = DeviceArray.from_numpy(start, c_type)
    _conveyor._gemm(kind, dtype, M, N, K, a._memory.address, b._memory.address, c._memory.address,
                    a_transposed=a_transposed, b_transposed=b_transposed, accumulate=accumulate,
                    allow_tf32=tf32)
    expected = A @ B + (DeviceArray.from_numpy(start, c_type).numpy() if accumulate else 0)
    return c.numpy().astype(np.float64), expected, np.abs(A) @ np.abs(B)


SHAPES = [(1, 1, 1), (7, 5, 3), (70, 45, 33), (130, 65, 97)]  # (M, N, K)


@pytest.mark.parametrize("transposed", ["A B", "A^T B", "A B^T"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
@pytest.mark.parametrize("kind", ["projection", "gradient"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_products_match_numpy(dtype, kind, shape, transposed, rng):
    M, N, K = shape
    got, expected, scale = run_gemm(kind, dtype, M, N, K, rng, a_transposed=transposed == "A^T B",
                                    b_transposed=transposed == "A B^T")
    assert np.all(np.isfinite(got)), "elements left unwritten (NaN)"
    error = np.abs(got - expected)
    bound = relative_bound(dtype, kind, False, K) * scale + np.abs(expected) * UNIT_ROUNDOFF[COMPUTE[dtype]]
    assert np.all(error <= bound), f"max error {error.max():.3g}, {np.max(error / bound):.3g} x the bound"


@pytest.mark.parametrize("kind", ["projection", "gradient"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_accumulate_adds_to_the_output(dtype, kind, rng):
    got, expected, scale = run_gemm(kind, dtype, 70, 45, 33, rng, accumulate=True)
    bound = relative_bound(dtype, kind, False, 33) * (scale + np.abs(expected))
    assert np.all(np.abs(got - expected) <= bound)


def test_tf32_rounds_float32_operands(rng):
    """allow_tf32 multiplies float32 on tensor cores: within TF32's bound, and not within float32's."""
    got, expected, scale = run_gemm("projection", "float32", 70, 45, 33, rng, tf32=True)
    error = np.abs(got - expected)
    assert np.all(error <= relative_bound("float32", "projection", True, 33) * scale)
    assert np.any(error > relative_bound("float32", "projection", False, 33) * scale), "no TF32 rounding seen"


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("kind", {"kind": "forward"}, "expected 'projection' or 'gradient', got 'forward'"),
        ("dtype_name", {"dtype_name": "int8"}, "expected float32, float64, float16 or bfloat16, got 'int8'"),
        ("K", {"K": -1}, "expected at least 0, got -1"),
    ],
)
def test_a_bad_argument_raises_naming_it(name, kwargs, message):
    args = {"kind": "projection", "dtype_name": "float32", "M": 1, "N": 1, "K": 1, "a": 0, "b": 0, "c": 0,
            **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: {message}$"):
        _conveyor._gemm(**args)
