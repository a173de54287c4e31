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


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_plan_takes_the_fewest_units_whose_blocks_fit_one_to_a_multiprocessor(direction):
    """Every block reads the whole step's input, so the plan takes more units per block (fewer blocks) where
    4 units a block would put two blocks on a multiprocessor: 4 units up to 4 x SMs, 8 up to 8 x SMs, then 16
    (bfloat16, where 16 units still fit)."""
    def units(hidden):
        launched = _conveyor._persistent_floor(1, 1, hidden, "bfloat16", 0, direction=direction)
        _conveyor._synchronize(0)
        return launched["units"], launched["multiprocessors"]

    _, multiprocessors = units(8)
    assert multiprocessors > 0
    for hidden, expected in [(4 * multiprocessors, 4), (4 * multiprocessors + 1, 8),
                             (8 * multiprocessors, 8), (8 * multiprocessors + 1, 16)]:
        assert units(hidden) == (expected, multiprocessors), f"H={hidden}"


@pytest.mark.parametrize("units", [4, 8, 16])
def test_units_asked_for_in_the_environment(units, monkeypatch):
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", str(units))
    launched = _conveyor._persistent_floor(2, 3, 70, "float32", 0, direction="backward")
    _conveyor._synchronize(0)
    assert (launched["units"], launched["blocks"]) == (units, math.ceil(70 / units))


def test_units_asked_for_that_do_not_fit_or_make_no_sense_raise(monkeypatch):
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", "16")
    with pytest.raises(ValueError, match=r"^hidden: .* cannot run H=2048 .*16 units takes \d+ bytes"):
        _conveyor._persistent_floor(1, 1, 2048, "float64", 0)
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", "5")
    with pytest.raises(ValueError, match=r"^CONVEYOR_PERSISTENT_UNITS: expected 4, 8 or 16, got '5'$"):
        _conveyor._persistent_floor(1, 1, 64, "float32", 0)
