"""The persistent kernels' floor (cuda/floor.cu, conveyor._conveyor._persistent_floor), which the benchmarks
time next to the kernels: it launches, with the block count of the persistent kernel's plan, for each dtype,
both directions and sizes on both sides of the plan's units per block, and finishes without a fault; a bad
argument raises ValueError naming it. Runs on a GPU and on the emulated build (CONVEYOR_EMULATE_CUDA)."""

import math

import pytest

from conveyor import _conveyor

pytestmark = pytest.mark.cuda

SIZES = [(1, 1, 1), (3, 5, 7), (4, 17, 70)]  # (T, B, H): H below, at and past a block's 4 units


@pytest.fixture
def stream():
    handle = _conveyor._stream_create(0)
    yield handle
    _conveyor._stream_destroy(0, handle)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}-B{}-H{}".format(*s))
def test_floor_runs_with_the_persistent_kernels_blocks(size, dtype, cell, direction, stream):
    steps, batch, hidden = size
    launched = _conveyor._persistent_floor(steps, batch, hidden, dtype, stream, cell=cell,
                                           direction=direction)
    _conveyor._synchronize(0, stream)  # a fault in the kernel surfaces here as RuntimeError
    assert launched["units"] in (4, 8, 16)
    assert launched["blocks"] == math.ceil(hidden / launched["units"])
    assert launched["shared_bytes"] > 0


def test_floor_runs_on_the_default_stream():
    _conveyor._persistent_floor(2, 3, 9, "float32", 0)
    _conveyor._synchronize(0)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("steps", {"steps": 0}),
        ("batch", {"batch": 0}),
        ("hidden", {"hidden": -1}),
        ("dtype_name", {"dtype_name": "int8"}),
        ("cell", {"cell": "transformer"}),
        ("direction", {"direction": "sideways"}),
    ],
)
def test_a_bad_argument_raises_naming_it(name, kwargs):
    args = {"steps": 2, "batch": 3, "hidden": 9, "dtype_name": "float32", "stream": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        _conveyor._persistent_floor(**args)


def test_hidden_too_large_for_the_persistent_kernel_raises_saying_why():
    with pytest.raises(ValueError, match=r"^hidden: the persistent forward kernel cannot run H=1000000"):
        _conveyor._persistent_floor(1, 1, 1_000_000, "float32", 0)
