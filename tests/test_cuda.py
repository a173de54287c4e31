"""The CUDA backend: every cell and option against the float64 reference and against the CPU backend,
outputs and every gradient, in float64 and float32; float16 and bfloat16 within twice the error of a naive
computation in the same dtype (docs/math.md, Precision), and what their rounding must not undo (the cell
clip's decisions, windows chained through the final state, small gradients); shapes that do not divide the
kernels' tiles, T=1, B=1 and T=4096; streams, the memory pool; mixed devices and bad arrays.

Arrays reach the backend as Conveyor's own device arrays (device_arrays.py), so every test runs on a GPU and
in the emulated build (CONVEYOR_EMULATE_CUDA) alike; the same tests through PyTorch and CuPy CUDA tensors,
and the tests of interop with them, run where those libraries have a GPU. Outputs are NaN-poisoned before
every run (conftest.py), so an element a kernel forgets to write fails. Every test carries the cuda marker
and is skipped without the CUDA backend and a device (a GPU, or the emulator)."""

import device_arrays
import numpy as np
import pytest
from device_arrays import DeviceArray

import conveyor
from conveyor import _arrays, _conveyor

import reference as ref
import support
from support import (
    ARRAY_FIELDS,
    CONFIGS,
    Problem,
    assert_close,
    config_id,
    make_problem,
    run_conveyor,
    run_reference,
)

pytestmark = pytest.mark.cuda

# Step kernels tile 16 batch rows x 32 hidden units; the GEMMs 64 x 64 with K slices of 16 and 32. These
# shapes fall on both sides of every tile edge.
SHAPES = [  # (T, B, I, H)
    (1, 1, 1, 1),
    (1, 1, 3, 5),
    (4, 3, 5, 7),
    (5, 17, 40, 70),
    (3, 33, 65, 129),
    (2, 16, 64, 32),
]


class DeviceArrays:
    name = "device"

    def to_device(self, a, dtype):
        return None if a is None else DeviceArray.from_numpy(a, dtype)

    def to_numpy(self, a):
        return None if a is None else a.numpy().astype(np.float64)

    def check_kind(self, name, a, dtype):
        assert isinstance(a, DeviceArray) and a.device == 0, f"{name}: {a!r}"
        assert a.dtype == dtype, f"{name}: {a.dtype}"


class TorchArrays:
    name = "torch"

    def __init__(self):
        self.torch = pytest.importorskip("torch", reason="interop with PyTorch CUDA tensors needs PyTorch")
        if not self.torch.cuda.is_available():
            pytest.skip("interop with PyTorch CUDA tensors needs PyTorch with a GPU")

    def to_device(self, a, dtype):
        t = self.torch
        return None if a is None else t.from_numpy(np.ascontiguousarray(a)).to(device="cuda",
                                                                               dtype=getattr(t, dtype))

    def to_numpy(self, a):
        return None if a is None else a.detach().to(self.torch.float64).cpu().numpy()

    def check_kind(self, name, a, dtype):
        assert isinstance(a, self.torch.Tensor) and a.is_cuda, f"{name}: {type(a).__name__}"
        assert a.dtype == getattr(self.torch, dtype), f"{name}: {a.dtype}"


class CupyArrays:
    name = "cupy"

    def __init__(self):
        self.cupy = pytest.importorskip("cupy", reason="interop with CuPy needs CuPy")
        if conveyor.cuda_emulated():
            pytest.skip("interop with CuPy needs a GPU, not the emulated build")

    def to_device(self, a, dtype):
        if dtype == "bfloat16":
            pytest.skip("CuPy has no bfloat16")
        return None if a is None else self.cupy.asarray(np.ascontiguousarray(a, dtype=dtype))

    def to_numpy(self, a):
        return None if a is None else self.cupy.asnumpy(a).astype(np.float64)

    def check_kind(self, name, a, dtype):
        assert isinstance(a, self.cupy.ndarray), f"{name}: {type(a).__name__}"
        assert a.dtype == np.dtype(dtype), f"{name}: {a.dtype}"


@pytest.fixture(params=["per_step", "persistent"])
def algorithm(request):
    """Every test of the backend runs both algorithms of the recurrence (conveyor.h, Algorithm)."""
    return request.param


def with_algorithm(arrays, algorithm):
    arrays.algorithm = algorithm
    return arrays


@pytest.fixture(params=["device", "torch", "cupy"])
def gpu(request, algorithm):
    kind = {"device": DeviceArrays, "torch": TorchArrays, "cupy": CupyArrays}[request.param]
    return with_algorithm(kind(), algorithm)


@pytest.fixture
def device(algorithm):
    return with_algorithm(DeviceArrays(), algorithm)


@pytest.fixture
def torch_gpu(algorithm):
    return with_algorithm(TorchArrays(), algorithm)


# The LSTM's cell-state arrays and their dtype beside x's (conveyor.h, cell_state_dtype): float32 beside
# 16-bit storage, since the backend keeps the cell state in float32 and hands it on unrounded.
CELL_STATE_ARRAYS = ("c0", "c_T", "dc_T", "dc0")


def cell_state_dtype(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def dtype_of(name: str, dtype: str) -> str:
    """The dtype of the array `name` of a call whose x is of `dtype`."""
    return cell_state_dtype(dtype) if name in CELL_STATE_ARRAYS else dtype


def on_device(p: Problem, gpu, dtype: str) -> Problem:
    return Problem(p.cell, p.options,
                   *(gpu.to_device(getattr(p, n), dtype_of(n, dtype)) for n in ARRAY_FIELDS))


def run_on_gpu(p: Problem, gpu, dtype: str, **options):
    """Forward and backward on the GPU; the results as float64 NumPy arrays, after checking their kind (and
    dtype: x's, or the cell state's for c_T and dc0)."""
    pd = on_device(p, gpu, dtype)
    pd.options = {**p.options, "algorithm": gpu.algorithm, **options}
    y, h_T, c_T, grads = run_conveyor(pd)
    results = {"y": y, "h_T": h_T, "c_T": c_T, **grads}
    for name, value in results.items():
        if value is not None:
            gpu.check_kind(name, value, dtype_of(name, dtype))
    return {name: gpu.to_numpy(value) for name, value in results.items()}


def reference_results(p: Problem):
    y, h_T, c_T, grads = run_reference(p)
    return {"y": y, "h_T": h_T, "c_T": c_T, **grads}


def assert_all_close(got: dict, expected: dict, dtype):
    """got: float64 copies of GPU results of `dtype` (run_on_gpu checked their dtype), compared in it."""
    support.assert_all_close({k: None if v is None else v.astype(dtype) for k, v in got.items()}, expected,
                             dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_reference(config, shape, dtype, gpu, rng):
    p = make_problem(*config, *shape, rng)
    assert_all_close(run_on_gpu(p, gpu, dtype), reference_results(p), np.dtype(dtype))


@pytest.mark.parametrize("shape", SHAPES[2:], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_the_cpu_backend(config, shape, device, rng):
    p = make_problem(*config, *shape, rng)
    y, h_T, c_T, grads = run_conveyor(p.cast(np.float32))
    cpu = {"y": y, "h_T": h_T, "c_T": c_T, **grads}
    assert_all_close(run_on_gpu(p, device, "float32"), cpu, np.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("variant", ["no-initial-state", "no-bias", "no-final-grads", "none-of-them"])
def test_optional_arguments(config, variant, gpu, rng):
    p = make_problem(*config, 4, 3, 5, 6, rng,
                     initial_state=variant not in ("no-initial-state", "none-of-them"),
                     bias=variant not in ("no-bias", "none-of-them"),
                     final_grads=variant not in ("no-final-grads", "none-of-them"))
    assert_all_close(run_on_gpu(p, gpu, "float64"), reference_results(p), np.float64)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_long_window_of_4096_steps(config, device, rng):
    p = make_problem(*config, 4096, 2, 3, 8, rng)
    assert_all_close(run_on_gpu(p, device, "float64"), reference_results(p), np.float64)
    y, h_T, c_T, _ = run_conveyor(p.cast(np.float32))
    got = run_on_gpu(p, device, "float32")
    assert_close("y", got["y"].astype(np.float32), y, np.float32)
    assert_close("h_T", got["h_T"].astype(np.float32), h_T, np.float32)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_grids_of_several_waves(config, device, rng):
    """Grids larger than the device holds at once: the time-parallel products' 161 blocks of 64 rows
    (T B = 10280) against 132 SMs, 34 blocks per step kernel, the persistent kernel's partial last block."""
    p = make_problem(*config, 40, 257, 5, 33, rng)
    assert_all_close(run_on_gpu(p, device, "float32"), reference_results(p), np.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_inference_mode_gives_the_same_outputs(config, device, rng):
    p = make_problem(*config, 5, 4, 6, 9, rng)
    pd = on_device(p, device, "float32")
    forward = getattr(conveyor, f"{p.cell}_forward")
    args = (pd.x, pd.W, pd.R, pd.bW, pd.bR, pd.h0) + ((pd.c0,) if p.cell == "lstm" else ())
    trained = forward(*args, **p.options, algorithm=device.algorithm)
    inferred = forward(*args, **p.options, training=False, algorithm=device.algorithm)
    assert inferred[-1] is None
    for a, b in zip(trained[:-1], inferred[:-1]):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(b.numpy(), a.numpy())


# ---------------------------------------------------------------------------------------------------------
# float16 and bfloat16: at most twice the error of a naive computation in the same dtype (PyTorch ops in that
# dtype, autograd for the gradients), plus one rounding of the output.

def naive_torch(p: Problem, dtype: str):
    """On the GPU where PyTorch has one, else on the CPU: either way PyTorch's products in `dtype`."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    where = "cuda" if torch.cuda.is_available() else "cpu"

    def leaf(a):
        return None if a is None else torch.tensor(a, dtype=dt, device=where, requires_grad=True)

    x, W, R, bW, bR, h0, c0 = (leaf(getattr(p, n)) for n in ("x", "W", "R", "bW", "bR", "h0", "c0"))
    H = p.R.shape[1]
    act = torch.relu if p.options.get("activation") == "relu" else torch.tanh
    h, c = h0, c0
    ys = []
    for t in range(p.x.shape[0]):
        ax = x[t] @ W.t() + bW
        if p.cell == "lstm":
            a = ax + h @ R.t() + bR
            i, f, g, o = (a[:, k * H:(k + 1) * H] for k in range(4))
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * act(g)
            h = torch.sigmoid(o) * act(c)
        elif p.cell == "gru":
            ar = h @ R[:2 * H].t() + bR[:2 * H]
            r = torch.sigmoid(ax[:, :H] + ar[:, :H])
            z = torch.sigmoid(ax[:, H:2 * H] + ar[:, H:])
            if p.options["reset_after"]:
                n = act(ax[:, 2 * H:] + r * (h @ R[2 * H:].t() + bR[2 * H:]))
            else:
                n = act(ax[:, 2 * H:] + (r * h) @ R[2 * H:].t() + bR[2 * H:])
            h = (1 - z) * n + z * h
        else:
            h = act(ax + h @ R.t() + bR)
        ys.append(h)
    y = torch.stack(ys)
    loss = (y * leaf(p.dy)).sum() + (h * leaf(p.dh_T)).sum()
    names = ["dx", "dW", "dR", "dbW", "dbR", "dh0"]
    inputs = [x, W, R, bW, bR, h0]
    outputs = {"y": y, "h_T": h, "c_T": None}
    if p.cell == "lstm":
        loss = loss + (c * leaf(p.dc_T)).sum()
        names.append("dc0")
        inputs.append(c0)
        outputs["c_T"] = c
    grads = torch.autograd.grad(loss, inputs)
    results = {**outputs, **dict(zip(names, grads))}
    return {k: None if v is None else v.detach().to(torch.float64).cpu().numpy() for k, v in results.items()}


def clear_of_the_relu_kink(p: Problem, rng) -> Problem:
    """`p` with the pre-activations that feed a ReLU kept away from 0, where a 16-bit rounding could take
    either side of the kink: the gradient is discontinuous there, and a flip costs a whole dh, so a bound
    made of rounding errors cannot hold. The ReLU's bias block becomes +-3 (each unit always on or always off,
    both sides tested), far beyond what the weights add; the LSTM's c0 >= 0 keeps c_t, which a ReLU also
    reads, on one side (f, i > 0 and g = relu(.) >= 0)."""
    if p.options.get("activation") != "relu":
        return p
    H = p.R.shape[1]
    block = slice(0, H) if p.cell == "rnn" else slice(2 * H, 3 * H)  # RNN: its one block; LSTM g; GRU n
    p.bW = p.bW.copy()
    p.bW[block] = 3.0 * rng.choice([-1.0, 1.0], H)
    if p.cell == "lstm":
        p.c0 = np.abs(p.c0)
    return p


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_half_precision_within_twice_the_naive_error(config, dtype, device, rng):
    p = clear_of_the_relu_kink(make_problem(*config, 6, 5, 24, 40, rng), rng)
    assert_within_twice_the_naive_error(p, run_on_gpu(p, device, dtype), dtype)


def assert_within_twice_the_naive_error(p: Problem, got: dict, dtype: str):
    expected = reference_results(p)
    naive = naive_torch(p, dtype)
    unit_roundoff = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]
    for name, exact in expected.items():
        if exact is None:
            continue
        assert np.all(np.isfinite(got[name])), f"{name}: non-finite elements"
        ours = np.max(np.abs(got[name] - exact))
        bound = 2 * np.max(np.abs(naive[name] - exact)) + unit_roundoff * np.max(np.abs(exact))
        assert ours <= bound, (f"{name}: max error {ours:.3g} > bound {bound:.3g} "
                               f"(twice the naive {dtype} error)")


@pytest.mark.parametrize("units", [4, 16])
def test_persistent_tf32_rounds_da_in_the_backward_product(units, monkeypatch, rng):
    """With allow_tf32 the persistent backward multiplies da_{t+1} R on tensor cores in TF32: an RNN's dh_0
    follows a float64 backward recurrence (over the forward's own outputs) that rounds da to TF32 at each
    step, not one that keeps it whole (R holds TF32 values, so only da rounds; measured: all elements and
    0.3% of them within 2e-6)."""
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", str(units))
    T, B, I, H = 5, 17, 7, 37
    x, W, R = (to_tf32(rng.uniform(-0.5, 0.5, shape)) for shape in ((T, B, I), (H, I), (H, H)))
    dy = rng.uniform(-1, 1, (T, B, H))
    device = DeviceArray.from_numpy
    run = {"allow_tf32": True, "algorithm": "persistent"}
    y, _, saved = conveyor.rnn_forward(device(x, "float32"), device(W, "float32"), device(R, "float32"), None,
                                       None, device(np.zeros((B, H)), "float32"), **run)
    grads = conveyor.rnn_backward(saved, device(dy, "float32"), None)
    got, outputs = grads.dh0.numpy().astype(np.float64), y.numpy().astype(np.float64)

    def backward(round_da):
        dh = np.zeros((B, H))
        for t in reversed(range(T)):
            dh = round_da((dh + dy[t]) * (1 - outputs[t] ** 2)) @ R
        return dh

    rounded, whole = backward(lambda da: to_tf32(da.astype(np.float32))), backward(lambda da: da)
    near_rounded, near_whole = (np.mean(np.abs(got - ref) < 2e-6) for ref in (rounded, whole))
    assert near_rounded > 0.9 and near_whole < 0.5, (near_rounded, near_whole)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float32-tf32", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("units", [4, 8, 16])
def test_persistent_kernels_at_every_units_per_block(units, config, dtype, monkeypatch, rng):
    """CONVEYOR_PERSISTENT_UNITS asks for the block's units: at H = 37 every tiling of the products runs (4
    units: 4 to 16 gate-unit columns, the warps splitting K; 16 units: up to 64 columns, a warp taking several
    tiles), FMA and tensor-core ones, with the last block's units partly past H and B = 17 in two passes of
    16 rows."""
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", str(units))
    p = clear_of_the_relu_kink(make_problem(*config, 4, 17, 5, 37, rng), rng)
    arrays = with_algorithm(DeviceArrays(), "persistent")
    if dtype == "bfloat16":
        assert_within_twice_the_naive_error(p, run_on_gpu(p, arrays, dtype), dtype)
    elif dtype == "float32-tf32":
        assert_near_float32_in_tf32(run_on_gpu(p, arrays, "float32", allow_tf32=True), reference_results(p))
    else:
        assert_all_close(run_on_gpu(p, arrays, dtype), reference_results(p), np.dtype(dtype))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_tf32_option_stays_near_float32(config, device, rng):
    p = clear_of_the_relu_kink(make_problem(*config, 6, 8, 64, 48, rng), rng)
    assert_near_float32_in_tf32(run_on_gpu(p, device, "float32", allow_tf32=True), reference_results(p))


def assert_near_float32_in_tf32(got: dict, expected: dict):
    """Within 0.3% of each array's largest element: TF32 keeps 11 bits. (Measured over 12 seeds, every cell,
    both algorithms, 4, 8 and 16 units: at most 0.3 of this bound. An element-wise bound does not hold: a few
    small elements of a window carry errors of the large ones' size. The ReLU cells' problems must be clear of
    the kink, where a TF32 rounding flips a unit on or off.)"""
    for name, exact in expected.items():
        if exact is not None:
            error, scale = np.max(np.abs(got[name] - exact)), np.max(np.abs(exact))
            assert error <= 3e-3 * scale + 3e-4, f"{name}: max error {error:.3g}, largest element {scale:.3g}"


def to_tf32(a):
    """float32 values rounded to TF32 as cvt.rna does: to nearest on the 13 low mantissa bits, ties away."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("units", [4, 16])
def test_persistent_tf32_rounds_h_in_the_recurrent_product(units, monkeypatch, rng):
    """With allow_tf32 the persistent forward multiplies h_{t-1} R^T on tensor cores in TF32: an RNN whose x,
    W and R are TF32 values already, so that only h_{t-1} rounds, follows a float64 recurrence that rounds
    h_{t-1} to TF32 at each step (to float32's accuracy), not one that keeps it whole (measured: 99% and 21%
    of the elements within 2e-6, the 21% being the first step's, where h_0 = 0)."""
    monkeypatch.setenv("CONVEYOR_PERSISTENT_UNITS", str(units))
    T, B, I, H = 5, 17, 7, 37
    x, W, R = (to_tf32(rng.uniform(-0.5, 0.5, shape)) for shape in ((T, B, I), (H, I), (H, H)))
    bias = rng.uniform(-0.5, 0.5, H)

    def recurrence(round_h):
        h, ys = np.zeros((B, H)), []
        for t in range(T):
            h = np.tanh(x[t] @ W.T + bias + round_h(h) @ R.T)
            ys.append(h)
        return np.stack(ys)

    device = DeviceArray.from_numpy
    y, *_ = conveyor.rnn_forward(device(x, "float32"), device(W, "float32"), device(R, "float32"),
                                 device(bias, "float32"), None, training=False, allow_tf32=True,
                                 algorithm="persistent")
    got = y.numpy().astype(np.float64)
    rounded, whole = recurrence(lambda h: to_tf32(h.astype(np.float32))), recurrence(lambda h: h)
    # Most elements agree to float32's accuracy; a few do not, where float32's own rounding of h_{t-1} put
    # it on the other side of a TF32 rounding boundary than float64's did (a TF32 step in the product).
    near_rounded, near_whole = (np.mean(np.abs(got - ref) < 2e-6) for ref in (rounded, whole))
    assert near_rounded > 0.9 and near_whole < 0.5, (near_rounded, near_whole)


# ---------------------------------------------------------------------------------------------------------
# float16 and bfloat16: what rounding to the storage type must not change. The clip decisions, the state
# that chains windows and small gradients are made in float32 (docs/math.md, Precision); storage rounding
# must not undo them.

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def rounded_to(a, dtype: str) -> np.ndarray:
    """float64 copies of `a` rounded to `dtype` as the device stores it."""
    return DeviceArray.from_numpy(np.asarray(a, dtype=np.float64), dtype).numpy().astype(np.float64)


def clip_bound_rounding(direction: str, dtype: str) -> float:
    """A cell_clip near 0.6 that `dtype` does not hold and rounds `direction` ("up" or "down")."""
    for clip in np.linspace(0.55, 0.65, 1001):
        stored = rounded_to([np.float32(clip)], dtype)[0]
        if stored != clip and (stored > clip) == (direction == "up"):
            return float(clip)
    raise AssertionError(f"no cell_clip near 0.6 rounds {direction} in {dtype}")


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cell_clip_stops_the_gradient_of_exactly_the_clipped_units(dtype, direction, device,
                                                                                    rng):
    """Cell values within a few units in the last place of the storage type on either side of a bound that
    the type rounds `direction`: rounded to the nearest value of the type, some unclipped ones land on the
    bound (direction up), or the clipped ones, at the bound, fall inside it (down). The backward must still
    stop the gradient of exactly the units that the forward clipped in float32."""
    B, H = 8, 32
    clip = clip_bound_rounding(direction, dtype)
    u = UNIT_ROUNDOFF[dtype]
    a_i = rounded_to(rng.uniform(2.0, 6.0, (B, H)), dtype)
    a_f, a_o = rng.uniform(-1.0, 1.0, (2, B, H))
    # c_1 = i * g from c_0 = 0: aim g at c_1 = +-clip * (1 + 3u * uniform(-1, 1)).
    target = clip * (1 + rng.uniform(-3 * u, 3 * u, (B, H))) * rng.choice([-1.0, 1.0], (B, H))
    a_g = np.arctanh(target * (1 + np.exp(-a_i)))
    # W = I: x_0 holds the pre-activations, and dx_0 their gradients, unit by unit.
    p = Problem("lstm", {"cell_clip": clip},
                x=rounded_to(np.concatenate([a_i, a_f, a_g, a_o], axis=1)[None], dtype), W=np.eye(4 * H),
                R=rounded_to(rng.uniform(-0.2, 0.2, (4 * H, H)), dtype), bW=None, bR=None, h0=None,
                c0=np.zeros((B, H)), dy=rounded_to(rng.uniform(-1, 1, (1, B, H)), dtype), dh_T=None,
                dc_T=rounded_to(rng.uniform(-1, 1, (B, H)), dtype))
    no_bias, no_state = np.zeros(4 * H), np.zeros((B, H))
    cache = ref.lstm_forward(p.x, p.W, p.R, no_bias, no_bias, no_state, p.c0, cell_clip=clip)[3]
    c = cache["c_unclipped"][0]
    clear = np.abs(np.abs(c) - clip) > 1e-5 * clip  # where float32 clips as float64 does
    clipped = np.abs(c) >= clip
    nearest = np.abs(rounded_to(np.clip(c, -clip, clip), dtype))
    assert np.any(clear & (clipped != (nearest >= clip))), "no unit here that nearest rounding misjudges"

    got, expected = run_on_gpu(p, device, dtype), reference_results(p)
    # Every gradient through c_1: those of a_i and a_g, and dc0. The values too, but for da_i, whose
    # sigmoid'(a_i) = i (1 - i) loses digits to the cached i near 1, as in any 16-bit cache.
    for name, value, ref_value in (("da_i", got["dx"][0, :, :H], None),
                                   ("da_g", got["dx"][0, :, 2 * H:3 * H], expected["dx"][0, :, 2 * H:3 * H]),
                                   ("dc0", got["dc0"], expected["dc0"])):
        through_clipped = np.count_nonzero(value[clear & clipped])
        assert through_clipped == 0, f"{name}: a gradient through {through_clipped} clipped units"
        lost = np.count_nonzero(value[clear & ~clipped] == 0)
        assert lost == 0, f"{name}: no gradient through {lost} unclipped units"
        if ref_value is not None:
            np.testing.assert_allclose(value[clear], ref_value[clear], rtol=4 * u,
                                       atol=4 * u * np.max(np.abs(ref_value)), err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_two_runs_agree_bit_for_bit(config, dtype, device, rng):
    """Deterministic kernels: the persistent kernels' split products add their parts in a fixed order, so no
    schedule changes a result (the emulator runs the threads of the two calls in different orders)."""
    p = make_problem(*config, 6, 19, 12, 37, rng)
    first, second = run_on_gpu(p, device, dtype), run_on_gpu(p, device, dtype)
    for name, value in first.items():
        if value is not None:
            np.testing.assert_array_equal(second[name], value, err_msg=name)


def test_persistent_where_it_cannot_run_raises_saying_why(rng):
    """Forced where the slices of R do not fit on the device, the persistent kernel refuses with the reason,
    before any work; auto runs the same window on the per-step kernels."""
    H = 2048  # float64 LSTM: a block's slice of R for 4 units is 4 * 4 * 2048 * 8 bytes, over 227 KiB
    x, W, R = (DeviceArray.from_numpy(rng.uniform(-0.1, 0.1, shape), "float64")
               for shape in ((1, 1, 1), (4 * H, 1), (4 * H, H)))
    message = r"algorithm: 'persistent' cannot run this lstm forward window: .*shared memory"
    with pytest.raises(ValueError, match=message):
        conveyor.lstm_forward(x, W, R, None, None, algorithm="persistent", training=False)
    y, *_ = conveyor.lstm_forward(x, W, R, None, None, training=False)
    assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_window_equals_its_two_halves_chained_through_the_final_state(dtype, device, rng):
    """docs/math.md: a sequence cut into windows gives exactly the outputs of one call over the whole of it,
    in every storage type, since the state the halves hand over is the state the whole call carries (c_T is
    float32, unrounded, beside 16-bit storage)."""
    T = 8
    p = make_problem("lstm", {}, T, 5, 24, 40, rng)
    W, R, bW, bR, h0 = (DeviceArray.from_numpy(a, dtype) for a in (p.W, p.R, p.bW, p.bR, p.h0))
    c0 = DeviceArray.from_numpy(p.c0, cell_state_dtype(dtype))
    run = {"training": False, "algorithm": device.algorithm}
    def window(x, h, c):
        return conveyor.lstm_forward(DeviceArray.from_numpy(x, dtype), W, R, bW, bR, h, c, **run)

    whole = window(p.x, h0, c0)
    y1, h1, c1, _ = window(p.x[:T // 2], h0, c0)
    y2, h2, c2, _ = window(p.x[T // 2:], h1, c1)
    halves = {"y": np.concatenate([y1.numpy(), y2.numpy()]), "h_T": h2.numpy(), "c_T": c2.numpy()}
    for name, value in zip(("y", "h_T", "c_T"), whole[:3]):
        np.testing.assert_array_equal(halves[name], value.numpy(), err_msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cell_state_arrays_are_float32(dtype, training, device, rng):
    """c0 and dc_T go in, c_T and dc0 come out, as float32 beside 16-bit x; the rest in x's dtype."""
    p = on_device(make_problem("lstm", {}, 3, 4, 5, 6, rng), device, dtype)
    assert (p.c0.dtype, p.dc_T.dtype) == ("float32", "float32")
    y, h_T, c_T, saved = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0, training=training)
    assert (y.dtype, h_T.dtype, c_T.dtype) == (dtype, dtype, "float32")
    # Without c0 too: the zeros the backend makes stand for a float32 state.
    _, _, c_T_from_zeros, _ = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, training=False)
    assert c_T_from_zeros.dtype == "float32" and np.all(np.isfinite(c_T_from_zeros.numpy()))
    if not training:
        return
    for dc_T in (p.dc_T, None):
        _, _, c_T, saved = conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)
        grads = conveyor.lstm_backward(saved, p.dy, p.dh_T, dc_T)
        assert grads.dc0.dtype == "float32", grads.dc0
        assert np.all(np.isfinite(grads.dc0.numpy()))
        for name in ("dx", "dh0", "dW", "dR", "dbW", "dbR"):
            assert getattr(grads, name).dtype == dtype, name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_cell_state_arrays_of_x_dtype_are_refused(dtype, device, rng):
    p = make_problem("lstm", {}, 3, 4, 5, 6, rng)
    pd = on_device(p, device, dtype)
    c0 = DeviceArray.from_numpy(p.c0, dtype)
    message = rf"c0: expected dtype float32 \(the cell state's, for {dtype} x\), got {dtype}"
    with pytest.raises(TypeError, match=message):
        conveyor.lstm_forward(pd.x, pd.W, pd.R, pd.bW, pd.bR, pd.h0, c0)
    _, _, _, saved = conveyor.lstm_forward(pd.x, pd.W, pd.R, pd.bW, pd.bR, pd.h0, pd.c0)
    dc_T = DeviceArray.from_numpy(p.dc_T, dtype)
    message = rf"dc_T: expected dtype float32 \(the cell state's, for {dtype} x\), got {dtype}"
    with pytest.raises(TypeError, match=message):
        conveyor.lstm_backward(saved, pd.dy, pd.dh_T, dc_T)
    # A refused call leaves `saved` for the next one.
    assert conveyor.lstm_backward(saved, pd.dy, pd.dh_T, pd.dc_T).dc0.dtype == "float32"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_allocator_makes_device_arrays_of_a_named_dtype(dtype, device):
    """The array-API path of the output allocator: x's dtype by default, else the dtype the core names."""
    x = DeviceArray.from_numpy(np.zeros((2, 3)), dtype)
    allocate = _arrays.Allocator(x)
    assert allocate((4, 5)).dtype == dtype
    for name in ("float32", "float64", "float16", "bfloat16"):
        out = allocate((4, 5), name)
        assert isinstance(out, DeviceArray) and out.shape == (4, 5) and out.dtype == name


@pytest.mark.parametrize("config", CONFIGS[:4], ids=config_id)
def test_float16_gradients_of_a_small_loss_do_not_flush_to_zero(config, device, rng):
    """A loss scaled by 2^-20 scales every gradient by it. The pre-activation gradients then lie below
    float16's smallest normal number (6.1e-5), many below its smallest subnormal (6e-8): the weight
    gradients are still their reference scaled the same way, up to float16's own rounding of them."""
    scale = 2.0 ** -20
    p = make_problem(*config, 6, 5, 24, 40, rng)
    p.dy, p.dh_T = p.dy * scale, p.dh_T * scale
    if p.dc_T is not None:
        p.dc_T = p.dc_T * scale
    p = p.cast(np.float16).cast(np.float64)  # the reference reads what the device reads
    expected = reference_results(p)
    got = run_on_gpu(p, device, "float16")
    wrong = []
    for name in ("dx", "dW", "dR"):
        held = np.abs(expected[name]) >= 2.0 ** -24  # float16's smallest subnormal: what it can hold
        flushed = np.count_nonzero(got[name][held] == 0)
        # The result's own rounding to float16 (twice for dR, whose products from h0 and from y add up in
        # it) is within float16's subnormal spacing 2^-24.
        excess = np.abs(got[name] - expected[name]) - (2.0 ** -24 + 2.0 ** -8 * np.abs(expected[name]))
        if flushed or np.any(excess > 0):
            wrong.append(f"{name}: {flushed} of {np.count_nonzero(held)} flushed to zero, "
                         f"{np.count_nonzero(excess > 0)} beyond 2^-24 + 2^-8 |ref|")
    assert not wrong, "; ".join(wrong)


# ---------------------------------------------------------------------------------------------------------
# Streams, devices and bad arrays

def test_runs_on_a_given_stream(device, rng):
    p = on_device(make_problem("lstm", {}, 16, 8, 32, 64, rng), device, "float32")
    args = (p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)
    expected, *_ = conveyor.lstm_forward(*args, training=False)
    stream = device_arrays.stream_create()
    try:
        y, h_T, c_T, saved = conveyor.lstm_forward(*args, stream=stream)
        grads = conveyor.lstm_backward(saved, y, stream=stream)
        device_arrays.synchronize(stream)
    finally:
        device_arrays.stream_destroy(stream)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())
    assert np.all(np.isfinite(grads.dW.numpy()))


def test_workspace_memory_stays_in_the_pool_between_calls(device, rng):
    """Workspace comes from the device's default stream-ordered pool (cudaMallocAsync), whose release
    threshold of 0 would hand every byte back to the driver at each synchronisation, to be mapped again at
    the next call: the backend raises it."""
    p = on_device(make_problem("lstm", {}, 4, 3, 5, 6, rng), device, "float32")
    conveyor.lstm_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)
    device_arrays.synchronize()
    assert _conveyor._pool_release_threshold(0) > 0


def test_runs_on_the_callers_current_and_given_streams(torch_gpu, rng):
    torch = torch_gpu.torch
    p = on_device(make_problem("lstm", {}, 16, 8, 32, 64, rng), torch_gpu, "float32")
    args = (p.x, p.W, p.R, p.bW, p.bR, p.h0, p.c0)
    expected, *_ = conveyor.lstm_forward(*args, training=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_current, *_ = conveyor.lstm_forward(*args, training=False)
    side.synchronize()
    given, *_ = conveyor.lstm_forward(*args, training=False, stream=side)
    side.synchronize()
    torch.testing.assert_close(on_current, expected, rtol=0, atol=0)
    torch.testing.assert_close(given, expected, rtol=0, atol=0)


def test_cupy_current_stream(rng):
    cupy = pytest.importorskip("cupy", reason="interop with CuPy needs CuPy")
    p = make_problem("gru", {"reset_after": False}, 8, 4, 16, 32, rng)
    pd = on_device(p, CupyArrays(), "float32")
    args = (pd.x, pd.W, pd.R, pd.bW, pd.bR, pd.h0)
    expected, *_ = conveyor.gru_forward(*args, reset_after=False, training=False)
    with cupy.cuda.Stream() as stream:
        got, *_ = conveyor.gru_forward(*args, reset_after=False, training=False)
        stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(expected))


def test_outputs_are_on_the_device_of_x(gpu, rng):
    p = on_device(make_problem("rnn", {}, 3, 2, 4, 5, rng), gpu, "float32")
    y, h_T, _ = conveyor.rnn_forward(p.x, p.W, p.R, p.bW, p.bR, p.h0, training=False)
    assert y.device == p.x.device and h_T.device == p.x.device
    gpu.check_kind("y", y, "float32")


@pytest.mark.parametrize("other", ["numpy", "torch-cpu"])
def test_mixed_devices_raise_naming_the_argument(other, device, rng):
    p = make_problem("lstm", {}, 3, 2, 4, 5, rng).cast(np.float32)
    pd = on_device(p, device, "float32")
    W = p.W if other == "numpy" else pytest.importorskip("torch").from_numpy(p.W)
    message = r"W: expected an array on cuda:\d+ \(the device of x\), got one on cpu"
    with pytest.raises(ValueError, match=message):
        conveyor.lstm_forward(pd.x, W, pd.R, pd.bW, pd.bR)


def test_bad_gpu_arrays_raise(device, rng):
    p = on_device(make_problem("lstm", {}, 3, 2, 4, 5, rng), device, "float32")
    with pytest.raises(TypeError, match="W: expected a float32, float64, float16 or bfloat16 array"):
        conveyor.lstm_forward(p.x, p.W.astype("int32"), p.R, None, None)
    with pytest.raises(ValueError, match="R: expected a C-contiguous array"):
        conveyor.lstm_forward(p.x, p.W, p.R.reshape(5, 20).T, None, None)
    with pytest.raises(TypeError, match="W: expected dtype float32 \\(the dtype of x\\), got float16"):
        conveyor.lstm_forward(p.x, p.W.astype("float16"), p.R, None, None)


def test_tensors_that_require_grad_are_read_in_place(torch_gpu, rng):
    p = on_device(make_problem("rnn", {}, 3, 2, 4, 5, rng), torch_gpu, "float32")
    W = p.W.clone().requires_grad_(True)
    y, _, _ = conveyor.rnn_forward(p.x, W, p.R, p.bW, p.bR, training=False)
    expected, _, _ = conveyor.rnn_forward(p.x, p.W, p.R, p.bW, p.bR, training=False)
    torch_gpu.torch.testing.assert_close(y, expected, rtol=0, atol=0)
