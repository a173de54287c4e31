"""The variants on the CUDA backend (cuda marker; a GPU or the emulated build): every LSTM option combination
and recurrent dropout against the float64 reference, and dropout masks equal to the CPU's bit for bit,
through Conveyor's own device arrays (device_arrays.py); then, where PyTorch or CuPy has a GPU, stacks equal
to the CPU's, gradient clipping on their arrays, training on CuPy and the torch drop-in against cuDNN."""

import numpy as np
import pytest
from device_arrays import DeviceArray
from test_variants import LSTM_OPTIONS, lstm_id, lstm_problem, reference_lstm

import conveyor

import reference as ref
from support import CONFIGS, assert_close, config_id

pytestmark = pytest.mark.cuda


@pytest.fixture
def torch():
    """PyTorch with a GPU, for the tests of interop with its CUDA tensors."""
    torch = pytest.importorskip("torch", reason="interop with PyTorch CUDA tensors needs PyTorch")
    if not torch.cuda.is_available():
        pytest.skip("interop with PyTorch CUDA tensors needs PyTorch with a GPU")
    return torch


def to_gpu(arrays: dict, dtype):
    return {k: None if v is None else DeviceArray.from_numpy(v, dtype) for k, v in arrays.items()}


def to_numpy(value):
    if value is None:
        return None
    if isinstance(value, DeviceArray):
        return value.numpy().astype(np.float64)
    return value.detach().double().cpu().numpy()


def problem_clear_of_the_clip_bound(o, rng, margin=1e-3):
    """A problem on which float32 makes the clip decisions of float64: the same units are clipped with the
    bound moved by a relative `margin` either way, so no cell value comes within it of the bound, and the
    clip acts somewhere."""
    def clipped(p, bound):
        _, cache = reference_lstm(p, {**o, "cell_clip": bound})
        return np.abs(cache["cs"][1:]) == bound

    while True:
        p = lstm_problem(o, 6, 3, 5, 7, rng)
        low, high = clipped(p, o["cell_clip"] * (1 - margin)), clipped(p, o["cell_clip"] * (1 + margin))
        if np.any(low) and np.array_equal(low, high):
            return p


@pytest.mark.parametrize("algorithm", ["per_step", "persistent"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("o", LSTM_OPTIONS, ids=lstm_id)
def test_lstm_options_on_the_gpu_match_the_reference(o, dtype, algorithm, rng):
    p = lstm_problem(o, 6, 3, 5, 7, rng)
    if dtype == "float32" and o["cell_clip"]:
        p = problem_clear_of_the_clip_bound(o, rng)
    expected, _ = reference_lstm(p, o)
    g = to_gpu(p, dtype)

    def forward():
        return conveyor.lstm_forward(
            g["x"], g["W"], g["R"], g["bW"], g["bR"], g["h0"], g["c0"], P=g["P"], W_hr=g["W_hr"],
            coupled_gates=o["coupled_gates"], forget_bias=o["forget_bias"], cell_clip=o["cell_clip"],
            activation=o["activation"], algorithm=algorithm)

    if o["proj_size"] and algorithm == "persistent":  # the projection runs on the per-step kernels only
        with pytest.raises(ValueError, match=r"'persistent' cannot run .*a projection \(W_hr\) runs on the "
                                             r"per-step kernels"):
            forward()
        return
    y, h_T, c_T, saved = forward()
    grads = conveyor.lstm_backward(saved, g["dy"], g["dh_T"], g["dc_T"])._asdict()
    got = {"y": y, "h_T": h_T, "c_T": c_T, **grads}
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert isinstance(got[name], DeviceArray), name
            assert_close(name, to_numpy(got[name]).astype(dtype), value, np.dtype(dtype))


@pytest.mark.parametrize("algorithm", ["per_step", "persistent"])
@pytest.mark.parametrize("variational", [True, False], ids=["variational", "per-step"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_recurrent_dropout_on_the_gpu_matches_the_cpu(config, variational, algorithm, rng):
    cell, options = config
    T, B, I, H = 5, 4, 3, 6
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    arrays = dict(x=rng.uniform(-1, 1, (T, B, I)), W=rng.uniform(-0.4, 0.4, (G * H, I)),
                  R=rng.uniform(-0.4, 0.4, (G * H, H)), bW=rng.uniform(-0.4, 0.4, G * H),
                  bR=rng.uniform(-0.4, 0.4, G * H), h0=rng.uniform(-0.5, 0.5, (B, H)))
    dy = rng.uniform(-1, 1, (T, B, H))
    dropout = dict(recurrent_dropout=0.3, variational=variational, seed=21, mask_stream=4)
    forward, backward = getattr(conveyor, f"{cell}_forward"), getattr(conveyor, f"{cell}_backward")

    def run(a, d):
        out = forward(a["x"], a["W"], a["R"], a["bW"], a["bR"], a["h0"], **options, **dropout)
        grads = backward(out[-1], d)._asdict()
        return {"y": out[0], "h_T": out[1], **grads}

    cpu = run(arrays, dy)
    g = to_gpu({**arrays, "dy": dy}, "float64")
    dropout["algorithm"] = algorithm
    gpu = run(g, g["dy"])
    for name, value in cpu.items():
        if value is not None and name != "dP":
            assert_close(name, to_numpy(gpu[name]), value, np.float64)


@pytest.mark.parametrize("variational", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_masks_on_the_gpu_equal_the_cpus_bit_for_bit(dtype, variational):
    like = DeviceArray.from_numpy(np.zeros(1), dtype)
    got = conveyor.dropout_mask(like, (9, 7, 45), 0.35, variational=variational, seed=2**63 + 5,
                                mask_stream=12)
    assert isinstance(got, DeviceArray) and got.dtype == dtype
    expected = ref.dropout_mask(0.35, variational, 2**63 + 5, 12, (9, 7, 45))
    # The mask's values rounded to the dtype as the host rounds them: 0 and 1 / (1 - p) in that type.
    np.testing.assert_array_equal(to_numpy(got), to_numpy(DeviceArray.from_numpy(expected, dtype)))


def test_masks_through_cupy(rng):
    cupy = pytest.importorskip("cupy", reason="interop with CuPy needs CuPy")
    got = conveyor.dropout_mask(cupy.zeros(1, cupy.float32), (4, 3, 10), 0.5, seed=1)
    assert isinstance(got, cupy.ndarray)
    expected = ref.dropout_mask(0.5, False, 1, 0, (4, 3, 10)).astype(np.float32)
    np.testing.assert_array_equal(cupy.asnumpy(got), expected)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stacks_on_the_gpu_equal_the_cpus(cell, torch, rng):
    layer = {"lstm": conveyor.LSTM, "gru": conveyor.GRU, "rnn": conveyor.RNN}[cell](
        4, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    weights = layer._weights()
    gpu_weights = [tuple(None if w is None else torch.from_numpy(w).cuda() for w in entry)
                   for entry in weights]
    x, dy = rng.standard_normal((6, 3, 4)), rng.standard_normal((6, 3, 10))
    options = dict(num_layers=2, bidirectional=True, dropout=0.3, recurrent_dropout=0.2, seed=9)
    y, h_n, _, saved = conveyor.stack_forward(cell, x, weights, **options)
    grads = conveyor.stack_backward(saved, dy)
    gy, gh_n, _, gsaved = conveyor.stack_forward(cell, torch.from_numpy(x).cuda(), gpu_weights, **options)
    ggrads = conveyor.stack_backward(gsaved, torch.from_numpy(dy).cuda())
    assert_close("y", to_numpy(gy), y, np.float64)
    assert_close("h_n", to_numpy(gh_n), h_n, np.float64)
    assert_close("dx", to_numpy(ggrads.dx), grads.dx, np.float64)
    for k, (g, c) in enumerate(zip(ggrads.weights, grads.weights)):
        assert_close(f"dR[{k}]", to_numpy(g.dR), c.dR, np.float64)
        assert_close(f"dW[{k}]", to_numpy(g.dW), c.dW, np.float64)


def test_clip_grad_norm_on_gpu_arrays(torch, rng):
    grads = [torch.from_numpy(rng.standard_normal(50) * 3).cuda(),
             torch.from_numpy(rng.standard_normal(7)).cuda()]
    expected = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert conveyor.clip_grad_norm(grads, 1.0) == pytest.approx(expected, rel=1e-12)
    assert float(torch.sqrt(sum((g ** 2).sum() for g in grads))) == pytest.approx(1.0, rel=1e-5)


def test_training_on_the_gpu_follows_the_cpu(tmp_path):
    """conveyor train --device cuda: every array on the GPU (CuPy), the same losses as on the CPU."""
    pytest.importorskip("cupy", reason="interop with CuPy needs CuPy")
    from conveyor.train import Config, LanguageTask, language, run

    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 60)
    corpus = language.load_corpus(str(path), "char")
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = Config(embedding=16, hidden=32, layers=2, batch=4, k1=16, k2=32, max_steps=15, eval_every=0,
                     eval_batch=2, dropout=0.1, lr=1e-2, seed=4, device=device)
        runs[device] = run(LanguageTask(LanguageTask.defaults(cfg), corpus), sample_length=20,
                           checkpoint=str(tmp_path / f"{device}.npz"))
    cpu, gpu = (np.array([loss for _, loss in runs[d]["trainer"].history]) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(gpu, cpu, rtol=2e-3)
    assert abs(runs["cuda"]["valid_loss"] - runs["cpu"]["valid_loss"]) < 1e-2


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_torch_dropin_on_the_gpu_matches_cudnn(cell, torch):
    """conveyor.torch modules on CUDA tensors (the current stream) against torch.nn's cuDNN modules."""
    import conveyor.torch as ct

    torch.manual_seed(8)
    reference = getattr(torch.nn, cell)(16, 32, num_layers=2, bidirectional=True).cuda().double()
    module = getattr(ct, cell)(16, 32, num_layers=2, bidirectional=True).cuda().double()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(12, 4, 16, device="cuda", dtype=torch.float64, requires_grad=True)
    expected, got = reference(x)[0], module(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    w = torch.randn_like(expected)
    grads_e = torch.autograd.grad((expected * w).sum(), [x] + list(reference.parameters()))
    grads_g = torch.autograd.grad((got * w).sum(), [x] + list(module.parameters()))
    for e, g in zip(grads_e, grads_g):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
