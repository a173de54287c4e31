"""Arrays of other libraries through DLPack, on the CPU: PyTorch tensors in, PyTorch tensors out, the same
numbers as NumPy bit for bit, and clear errors for what the path cannot take. The same path carries GPU
arrays (tests/test_cuda.py); these tests check its plumbing where CI can run it."""

import numpy as np
import pytest

import conveyor
from conveyor import _arrays, _conveyor

from support import ARRAY_FIELDS, CONFIGS, Problem, config_id, make_problem, run_conveyor

try:
    import torch
except ImportError:  # only the tests marked needs_torch use it; the others run without it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install torch)")


def as_torch(p: Problem, *, requires_grad=False) -> Problem:
    def t(a):
        return None if a is None else torch.from_numpy(a.copy()).requires_grad_(requires_grad)

    return Problem(p.cell, p.options, *(t(getattr(p, n)) for n in ARRAY_FIELDS))


@needs_torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_torch_tensors_give_numpy_results_exactly(config, dtype, rng):
    p = make_problem(*config, 4, 3, 5, 7, rng).cast(dtype)
    y, h_T, c_T, grads = run_conveyor(p)
    ty, th_T, tc_T, tgrads = run_conveyor(as_torch(p, requires_grad=True))
    for name, got, expected in [("y", ty, y), ("h_T", th_T, h_T), ("c_T", tc_T, c_T),
                                *((n, tgrads[n], grads[n]) for n in grads)]:
        if expected is None:
            assert got is None, name
            continue
        assert isinstance(got, torch.Tensor), f"{name}: {type(got).__name__}"
        assert got.dtype == getattr(torch, np.dtype(dtype).name), name
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=name)


@needs_torch
def test_mixed_numpy_and_torch_on_the_cpu_return_arrays_of_x_kind(rng):
    p = make_problem("gru", {}, 3, 2, 4, 5, rng)
    y, h_T, saved = conveyor.gru_forward(p.x, torch.from_numpy(p.W), p.R, p.bW, torch.from_numpy(p.bR), p.h0)
    assert isinstance(y, np.ndarray) and isinstance(h_T, np.ndarray)
    expected, _, _ = conveyor.gru_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, training=False)
    np.testing.assert_array_equal(y, expected)
    grads = conveyor.gru_backward(saved, torch.from_numpy(p.dy))
    assert isinstance(grads.dW, np.ndarray)


@needs_torch
def test_saved_from_torch_serves_one_backward(rng):
    p = as_torch(make_problem("lstm", {}, 2, 2, 3, 4, rng))
    _, _, _, saved = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)
    conveyor.lstm_backward(saved, p.dy)
    with pytest.raises(ValueError, match="saved: already used"):
        conveyor.lstm_backward(saved, p.dy)


@needs_torch
@pytest.mark.parametrize("case", ["bfloat16", "float16", "int64", "transposed", "list", "rank5",
                                  "wrong-shape"])
def test_bad_torch_arguments_raise_naming_the_argument(case, rng):
    p = as_torch(make_problem("lstm", {}, 3, 2, 4, 5, rng))
    args = dict(x=p.x, W=p.W, R=p.R, bW=p.bW, bR=p.bR, h0=p.h0, c0=p.c0)
    expected = {
        "bfloat16": (TypeError, "x: the CPU backend computes in float32 or float64, got bfloat16"),
        "float16": (TypeError, "x: the CPU backend computes in float32 or float64, got float16"),
        "int64": (TypeError, "W: expected a float32, float64, float16 or bfloat16 array, got DLPack type "
                             "code 0"),
        "transposed": (ValueError, "R: expected a C-contiguous array"),
        "list": (TypeError, "h0: expected an array .* got list"),
        "rank5": (ValueError, "x: expected at most 4 dimensions, got 5"),
        "wrong-shape": (ValueError, r"c0: expected shape \(2, 5\)"),
    }[case]
    if case in ("bfloat16", "float16"):
        args = {k: v.to(getattr(torch, case)) for k, v in args.items()}
    elif case == "int64":
        args["W"] = args["W"].to(torch.int64)
    elif case == "transposed":
        args["R"] = args["R"].reshape(5, 20).t()
    elif case == "list":
        args["h0"] = p.h0.tolist()
    elif case == "rank5":
        args["x"] = args["x"].reshape(3, 2, 4, 1, 1)
    else:
        args["c0"] = args["c0"][:, :4]
    with pytest.raises(expected[0], match=expected[1]):
        conveyor.lstm_forward(**args)


@needs_torch
@pytest.mark.parametrize("stream, error",
                         [("s", TypeError), (-1, ValueError), (True, TypeError), (1.5, TypeError)])
def test_bad_stream_raises(stream, error, rng):
    p = make_problem("rnn", {}, 2, 2, 3, 4, rng)
    with pytest.raises(error, match="stream: expected"):
        conveyor.rnn_forward(p.x, p.W, p.R, p.bW, p.bR, stream=stream)
    with pytest.raises(error, match="stream: expected"):
        conveyor.rnn_forward(torch.from_numpy(p.x), p.W, p.R, p.bW, p.bR, stream=stream)


@needs_torch
def test_stream_objects_and_handles_are_read():
    class TorchLikeStream:
        cuda_stream = 1234

    class CupyLikeStream:
        ptr = 5678

    x = torch.zeros(1)
    assert _arrays.stream_of(x, TorchLikeStream()) == 1234
    assert _arrays.stream_of(x, CupyLikeStream()) == 5678
    assert _arrays.stream_of(x, 42) == 42
    assert _arrays.stream_of(x, None) == 0  # a CPU tensor: no stream


@needs_torch
def test_allocator_makes_outputs_like_x_and_poisons_them():
    x = torch.zeros(2, dtype=torch.float32)
    _conveyor._set_poison_outputs(True)
    out = _arrays.Allocator(x)((3, 4))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (3, 4)
    assert torch.isnan(out).all()


@needs_torch
@pytest.mark.parametrize("x_dtype", ["float32", "float64", "float16", "bfloat16"])
def test_allocator_makes_outputs_of_the_dtype_it_is_asked_for(x_dtype):
    """The compiled core asks for the LSTM's c_T and dc0 in float32 beside 16-bit x: allocate(shape, name)."""
    _conveyor._set_poison_outputs(True)
    allocate = _arrays.Allocator(torch.zeros(2, dtype=getattr(torch, x_dtype)))
    assert allocate((3, 4)).dtype == getattr(torch, x_dtype)
    for name in ("float32", "float64", "float16", "bfloat16"):
        out = allocate((3, 4), name)
        assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, name) and out.shape == (3, 4)
        assert torch.isnan(out).all()
    if x_dtype != "bfloat16":
        allocate = _arrays.Allocator(np.zeros(2, dtype=x_dtype))
        assert allocate((3,)).dtype == np.dtype(x_dtype)
        for name in ("float32", "float64", "float16"):
            out = allocate((3,), name)
            assert isinstance(out, np.ndarray) and out.dtype == np.dtype(name) and np.isnan(out).all()


@needs_torch
@pytest.mark.parametrize("x_dtype", ["float16", "bfloat16"])
def test_the_cell_state_dtype_is_float32_beside_16_bit_x(x_dtype):
    assert _arrays.cell_state_dtype_name(getattr(torch, x_dtype)) == "float32"
    assert _arrays.cell_state_dtype_name(torch.float64) == "float64"
    assert _arrays.cell_state_dtype_name(np.dtype(np.float32)) == "float32"
    # A stack checks its states before any window runs (here one that could not run on the CPU).
    dt = getattr(torch, x_dtype)
    x, weights = torch.zeros(3, 2, 4, dtype=dt), [(torch.zeros(20, 4, dtype=dt), torch.zeros(20, 5, dtype=dt),
                                                   None, None, None)]
    message = rf"c0: expected dtype float32 \(the cell state's, for {x_dtype} x\), got {x_dtype}"
    with pytest.raises(TypeError, match=message):
        conveyor.stack_forward("lstm", x, weights, None, torch.zeros(1, 2, 5, dtype=dt))
    with pytest.raises(TypeError, match=f"x: the CPU backend computes in float32 or float64, got {x_dtype}"):
        conveyor.stack_forward("lstm", x, weights, None, torch.zeros(1, 2, 5))


def test_allocator_refuses_a_library_it_cannot_allocate_with():
    class Foreign:
        __module__ = "somelib.arrays"

        def __dlpack__(self, stream=None):
            raise AssertionError("not reached")

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(TypeError, match="x: Conveyor reads any array with __dlpack__, but makes its outputs"):
        conveyor.rnn_forward(Foreign(), np.zeros((4, 3)), np.zeros((4, 4)), None, None)


def test_a_bad_capsule_is_refused():
    class NotACapsule:
        __module__ = "torch"

        def __dlpack__(self, stream=None):
            return object()

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(TypeError, match="x: NotACapsule.__dlpack__.. did not return a DLPack capsule"):
        conveyor.rnn_forward(NotACapsule(), np.zeros((4, 3)), np.zeros((4, 4)), None, None)
