"""conveyor.torch.LSTM/GRU/RNN as drop-in replacements for torch.nn.LSTM/GRU/RNN: the same outputs and
gradients on the same state dict for every cell (the LSTM with and without proj_size), layer count,
direction, batch_first and initial state;
gradcheck in float64; state dicts both ways; a training loop that falls as torch's; torch.compile;
DistributedDataParallel; the refusals; and ``import conveyor`` without torch."""

import copy
import itertools
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("conveyor.torch")

CELLS = {
    "lstm": (lambda *a, **k: torch.nn.LSTM(*a, **k), lambda *a, **k: ct.LSTM(*a, **k)),
    "lstm-proj": (lambda *a, **k: torch.nn.LSTM(*a, proj_size=2, **k),
                  lambda *a, **k: ct.LSTM(*a, proj_size=2, **k)),
    "gru": (lambda *a, **k: torch.nn.GRU(*a, **k), lambda *a, **k: ct.GRU(*a, **k)),
    "rnn-tanh": (lambda *a, **k: torch.nn.RNN(*a, **k), lambda *a, **k: ct.RNN(*a, **k)),
    "rnn-relu": (lambda *a, **k: torch.nn.RNN(*a, nonlinearity="relu", **k),
                 lambda *a, **k: ct.RNN(*a, nonlinearity="relu", **k)),
}
CASES = list(itertools.product(CELLS, [1, 2], [False, True], [False, True], [False, True]))


def state_units(cell, hidden):
    """The units of h_0 and h_n: "lstm-proj" projects them to 2."""
    return 2 if cell == "lstm-proj" else hidden


def is_lstm(cell):
    return cell.startswith("lstm")


def pair(cell, *args, **kwargs):
    torch.manual_seed(0)
    reference = CELLS[cell][0](*args, **kwargs).double()
    module = CELLS[cell][1](*args, **kwargs).double()
    module.load_state_dict(reference.state_dict())
    return reference, module


def flat_outputs(out):
    y, state = out
    return (y,) + (tuple(state) if isinstance(state, tuple) else (state,))


@pytest.mark.parametrize(("cell", "layers", "bidirectional", "batch_first", "with_hx"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_same_outputs_and_gradients_as_torch(cell, layers, bidirectional, batch_first, with_hx):
    reference, module = pair(cell, 3, 5, num_layers=layers, bidirectional=bidirectional,
                             batch_first=batch_first)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 6, 3) if batch_first else (6, 2, 3), generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    D = 2 if bidirectional else 1
    hx = None
    inputs = [x]
    if with_hx:
        h0 = torch.randn(layers * D, 2, state_units(cell, 5), generator=gen, dtype=torch.float64,
                         requires_grad=True)
        inputs.append(h0)
        if is_lstm(cell):
            c0 = torch.randn(layers * D, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
            inputs.append(c0)
            hx = (h0, c0)
        else:
            hx = h0
    expected, got = flat_outputs(reference(x, hx)), flat_outputs(module(x, hx))
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in expected]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    loss_e = sum((o * w).sum() for o, w in zip(expected, weights))
    loss_g = sum((o * w).sum() for o, w in zip(got, weights))
    grads_e = torch.autograd.grad(loss_e, inputs + list(reference.parameters()))
    grads_g = torch.autograd.grad(loss_g, inputs + list(module.parameters()))
    for e, g in zip(grads_e, grads_g):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input(cell):
    reference, module = pair(cell, 3, 4)
    x = torch.randn(5, 3, dtype=torch.float64)
    for e, g in zip(flat_outputs(reference(x)), flat_outputs(module(x))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module", [
    lambda: ct.LSTM(3, 4, num_layers=2, bidirectional=True),
    lambda: ct.GRU(3, 4, num_layers=2),
    lambda: ct.GRU(3, 4, reset_after=False, activation="relu"),
    lambda: ct.RNN(3, 4, nonlinearity="relu", bidirectional=True),
    lambda: ct.LSTM(3, 4, peephole=True, coupled_gates=True, forget_bias=1.0, cell_clip=2.0),
    lambda: ct.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=3, peephole=True, cell_clip=2.0),
], ids=["lstm-2x-bi", "gru-2x", "gru-reset-before-relu", "rnn-relu-bi", "lstm-every-option",
        "lstm-proj-2x-bi-every-option"])
def test_gradcheck(module):
    torch.manual_seed(2)
    m = module().double()
    D = 2 if m.bidirectional else 1
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(m.num_layers * D, 2, getattr(m, "proj_size", 0) or 4, dtype=torch.float64,
                     requires_grad=True)
    if isinstance(m, ct.LSTM):
        c0 = torch.randn(m.num_layers * D, 2, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, h, c: flat_outputs(m(x, (h, c))), (x, h0, c0))
    else:
        assert torch.autograd.gradcheck(lambda x, h: flat_outputs(m(x, h)), (x, h0))
    # The parameters too: one at a time, as functions of the module's output.
    for name, p in m.named_parameters():
        def of_parameter(value, name=name):
            with torch.no_grad():
                original = getattr(m, name).clone()
                getattr(m, name).copy_(value)
            try:
                return flat_outputs(m(x.detach()))[0]
            finally:
                with torch.no_grad():
                    getattr(m, name).copy_(original)
        y = flat_outputs(m(x.detach()))[0]
        w = torch.randn_like(y)
        (grad,) = torch.autograd.grad((y * w).sum(), [p])
        eps = 1e-6
        index = tuple(int(torch.randint(0, n, (1,))) for n in p.shape)
        plus, minus = p.detach().clone(), p.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        fd = ((of_parameter(plus) * w).sum() - (of_parameter(minus) * w).sum()) / (2 * eps)
        assert abs(grad[index].item() - fd.item()) <= 1e-7 + 1e-5 * abs(fd.item()), (name, index)


def test_state_dicts_go_both_ways():
    torch.manual_seed(3)
    theirs = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    ours = ct.GRU(4, 6, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(back(x)[0], theirs(x)[0])
    assert all(isinstance(p, torch.nn.Parameter) for p in ours.parameters())


def test_initialisation_is_pytorchs():
    m = ct.LSTM(5, 16, num_layers=2)
    values = torch.cat([p.detach().flatten() for p in m.parameters()])
    bound = 1 / np.sqrt(16)
    assert values.abs().max() <= bound and abs(values.std().item() - bound / np.sqrt(3)) < 0.1 * bound


def test_a_training_loop_falls_as_torchs():
    def train(make):
        torch.manual_seed(4)
        rnn = make()
        head = torch.nn.Linear(8, 1)
        params = list(rnn.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.5)
        gen = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(30):
            x = torch.randint(0, 2, (10, 16, 1), generator=gen).float()
            target = torch.roll(x, 2, dims=0)  # recall the input two steps back
            opt.zero_grad()
            y, _ = rnn(x)
            loss = torch.nn.functional.mse_loss(head(y[2:]), target[2:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    theirs = train(lambda: torch.nn.LSTM(1, 8))
    ours = train(lambda: ct.LSTM(1, 8))
    assert ours[-5:].mean() < 0.8 * ours[:5].mean()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


class _Tagger(torch.nn.Module):
    """A small model around a Conveyor layer: what torch.compile, torch.export and torch.jit.trace see."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer
        units = getattr(layer, "proj_size", 0) or layer.hidden_size
        self.head = torch.nn.Linear(units * (2 if layer.bidirectional else 1), 3)

    def forward(self, x):
        return self.head(torch.tanh(self.rnn(x)[0])).sum(0)


@pytest.mark.parametrize("cell", ["lstm", "lstm-proj", "gru"])
def test_torch_compile_builds_one_graph_with_the_layer_in_it(cell):
    """Conveyor's forward and backward are custom operators (torch.library): dynamo finds no graph break,
    fullgraph=True compiles with inductor, and the compiled model gives the eager outputs and gradients."""
    torch.manual_seed(4)
    layer = CELLS[cell][1](3, 5, num_layers=2, bidirectional=True)
    model = _Tagger(layer)
    x = torch.randn(6, 4, 3)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    got = compiled(x)
    expected = model(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torch_export_and_jit_trace_keep_the_operator():
    torch.manual_seed(5)
    model = _Tagger(ct.GRU(3, 4, num_layers=2)).eval()
    x = torch.randn(5, 2, 3)
    expected = model(x)
    exported = torch.export.export(model, (x,))
    assert any("conveyor.stack_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), expected)
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(torch.randn(5, 2, 3) * 0 + x), expected)


def test_double_backward_is_refused_with_a_message():
    """Eager calls (the operators' bodies through an autograd.Function) and the operator itself (what a
    compiled graph calls) refuse a gradient of a gradient, saying so."""
    layer = ct.LSTM(2, 3).double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"conveyor: double backward \(the gradient of a gradient"):
        dx.sum().backward()
    flat = [p for p in layer.parameters()] + [x.new_empty(0), x.new_empty(0)]  # no peephole, no projection
    options = {"num_layers": 1, "bidirectional": False, "dropout": 0.0, "variational": False,
               "recurrent_dropout": 0.0, "activation": "tanh"}
    spec = ct._spec("lstm", (6,), options, True)
    h0 = torch.zeros(1, 2, 3, dtype=torch.float64)
    y = torch.ops.conveyor.stack_forward(x, h0, h0.clone(), flat, torch.zeros(1, dtype=torch.int64), None,
                                         spec)[0]
    torch.testing.assert_close(y, layer(x)[0])
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"conveyor: double backward \(the gradient of a gradient"):
        dx.sum().backward()


SURFACE_CASES = list(itertools.product(CELLS, [1, 2], [False, True], [True, False]))


@pytest.mark.parametrize(("cell", "layers", "bidirectional", "bias"), SURFACE_CASES,
                         ids=["-".join(map(str, c)) for c in SURFACE_CASES])
def test_the_module_surface_is_torchs(cell, layers, bidirectional, bias):
    """What models and tools read off torch.nn's RNNs: state_dict keys, _flat_weights_names, _flat_weights,
    all_weights, flatten_parameters, extra_repr, as torch.nn has them for every configuration."""
    reference, module = pair(cell, 3, 5, num_layers=layers, bidirectional=bidirectional, bias=bias)
    assert list(module.state_dict()) == list(reference.state_dict())
    assert module._flat_weights_names == reference._flat_weights_names
    assert [tuple(w.shape) for w in module._flat_weights] == [tuple(w.shape) for w in reference._flat_weights]
    assert [[tuple(w.shape) for w in ws] for ws in module.all_weights] == \
           [[tuple(w.shape) for w in ws] for ws in reference.all_weights]
    assert all(a is b for a, b in zip(module._flat_weights, module.parameters()))
    module.flatten_parameters()
    assert module.extra_repr() == reference.extra_repr()


def test_copies_saves_conversions_and_hooks(tmp_path):
    torch.manual_seed(6)
    model = _Tagger(ct.LSTM(3, 4, num_layers=2, peephole=True))
    x = torch.randn(5, 2, 3)
    expected = model(x)
    torch.testing.assert_close(copy.deepcopy(model)(x), expected)
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.rnn, tmp_path / "layer.pt")
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=False)(x), expected)
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(loaded(x)[0], model.rnn(x)[0])
    seen = []
    model.rnn.register_forward_hook(lambda module, inputs, output: seen.append(output[0].shape))
    doubled = model.double()
    assert doubled.rnn.weight_ih_l0.dtype == torch.float64
    assert doubled(x.double()).dtype == torch.float64 and seen == [(5, 2, 4)]
    model.to(torch.float32)
    torch.testing.assert_close(model(x), expected)


def test_distributed_data_parallel_sees_ordinary_parameters(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(6)
        plain = ct.LSTM(3, 4)
        wrapped = torch.nn.parallel.DistributedDataParallel(ct.LSTM(3, 4))
        wrapped.module.load_state_dict(plain.state_dict())
        x = torch.randn(5, 2, 3)
        plain(x)[0].sum().backward()
        wrapped(x)[0].sum().backward()
        for (name, p), q in zip(plain.named_parameters(), wrapped.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    finally:
        dist.destroy_process_group()


def test_dropout_trains_and_evaluates_as_expected():
    m = ct.LSTM(3, 4, num_layers=2, dropout=0.5, recurrent_dropout=0.3, variational=True)
    x = torch.randn(6, 2, 3)
    torch.manual_seed(7)
    a = m(x)[0]
    torch.manual_seed(7)
    b = m(x)[0]
    torch.testing.assert_close(a, b)  # masks come from torch's generator: seeded, reproducible
    assert not torch.equal(m(x)[0], a)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", list(CELLS))
def test_calls_without_gradients_take_the_inference_path(cell, monkeypatch):
    """Under torch.no_grad (and with every input frozen) the module builds no autograd node and the kernels
    save nothing, with the outputs of the autograd path; a training-mode module with dropout still drops."""
    from conveyor import _stack

    reference, module = pair(cell, 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with_grad = flat_outputs(module(x.clone().requires_grad_(True)))
    trainings = []
    real = _stack.StackPlan.run
    monkeypatch.setattr(_stack.StackPlan, "run",
                        lambda plan, *a, **k: trainings.append(plan.training) or real(plan, *a, **k))
    with torch.no_grad():
        without = flat_outputs(module(x))
    for a, b in zip(with_grad, without):
        assert b.grad_fn is None
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=0)
    for p in module.parameters():
        p.requires_grad_(False)
    frozen = flat_outputs(module(x))
    assert all(t.grad_fn is None for t in frozen) and trainings == [False, False]
    dropping = CELLS[cell][1](3, 5, num_layers=2, bidirectional=True, dropout=0.5).double()
    dropping.load_state_dict(reference.state_dict())
    torch.manual_seed(3)
    expected = dropping(x)[0]
    torch.manual_seed(3)
    with torch.no_grad():
        got = dropping(x)[0]
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)
    assert trainings[-1] is True


def test_cpu_tensors_share_memory_with_conveyors_outputs():
    """On the CPU the module hands NumPy views of the tensors to Conveyor (no DLPack export per tensor) and
    returns tensors on the outputs' memory; gradients flow as before (checked against torch elsewhere)."""
    module = ct.LSTM(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    y, (h_n, c_n) = module(x)
    assert y.dtype == torch.float32 and y.device.type == "cpu"
    torch.testing.assert_close(h_n[0], y[-1], rtol=0, atol=0)
    (y.sum() + c_n.sum()).backward()
    assert x.grad is not None and module.weight_hh_l0.grad.shape == (16, 4)


def test_a_layer_prepares_its_calls_once_and_follows_its_parameters_wherever_they_go(monkeypatch):
    """CPU calls run a StackPlan made once per mode on views of the parameters: repeated calls make no new
    one, and every way a parameter can change (in place, assigned anew, its .data replaced, .float(),
    functional_call, a parametrisation, a deep copy) gives torch.nn's outputs for the parameters as they
    are."""
    from conveyor import _stack

    made = []
    real_init = _stack.StackPlan.__init__
    monkeypatch.setattr(_stack.StackPlan, "__init__",
                        lambda plan, *a, **k: made.append(k["training"]) or real_init(plan, *a, **k))
    reference, module = pair("lstm", 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def same():
        with torch.no_grad():
            for a, b in zip(flat_outputs(module(x)), flat_outputs(reference(x))):
                torch.testing.assert_close(a, b)

    for _ in range(3):
        same()
        module(x)[0].sum().backward()
    assert made == [False, True]  # one plan for inference, one for training, over six calls
    with torch.no_grad():
        for name in ("weight_hh_l0", "bias_ih_l1"):
            getattr(module, name).mul_(-0.5)
            getattr(reference, name).mul_(-0.5)
    same()
    fresh = torch.randn(16, 3, dtype=torch.float64)
    module.weight_ih_l0 = torch.nn.Parameter(fresh.clone())
    reference.weight_ih_l0 = torch.nn.Parameter(fresh.clone())
    same()
    fresh = torch.randn(16, 4, dtype=torch.float64)
    module.weight_hh_l1.data = fresh.clone()
    reference.weight_hh_l1.data = fresh.clone()
    same()
    other = {name: torch.randn_like(p) for name, p in module.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(module, other, (x,))[0]
        torch.testing.assert_close(got, torch.func.functional_call(reference, other, (x,))[0])
    same()
    module.float(), reference.float()
    x = x.float()
    same()

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(module, "weight_hh_l0", Doubled())
    with torch.no_grad():
        reference.weight_hh_l0.mul_(2)
    same()  # a parametrised weight is not in _parameters: the module's attribute is read, each call anew
    module(x)[0].sum().backward()
    assert module.parametrizations.weight_hh_l0.original.grad is not None
    torch.nn.utils.parametrize.remove_parametrizations(module, "weight_hh_l0")
    twin = copy.deepcopy(module)
    assert "_plans" not in twin.__dict__
    with torch.no_grad():
        twin.weight_hh_l0.zero_()
    same()  # the copy's weights are its own, its plans too
    assert not torch.equal(twin(x)[0], module(x)[0])


def test_each_training_call_draws_its_own_masks():
    """A cached plan takes each call's seed: two training calls with dropout drop different units, and the
    same torch seed gives the same masks again."""
    module = ct.LSTM(3, 6, num_layers=2, dropout=0.5, recurrent_dropout=0.3, zoneout=0.2)
    x = torch.randn(4, 2, 3)
    torch.manual_seed(7)
    first, second = module(x)[0], module(x)[0]
    assert not torch.equal(first, second)
    torch.manual_seed(7)
    torch.testing.assert_close(module(x)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-state", "hx"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_cell_state_reaches_conveyor_as_float32_and_returns_in_the_inputs_dtype(dtype, with_hx,
                                                                                         monkeypatch):
    """Conveyor takes and returns the LSTM's cell state as float32 beside 16-bit x (the CUDA backend keeps it
    so); the drop-in keeps torch.nn.LSTM's dtypes: c_0 and c_n in x's dtype, gradients reaching c_0 in it.
    The CPU backend computes in float32 and float64 only, so here the stack is stood in for by Conveyor's
    float64 stack on converted copies, which records the dtypes it was handed."""
    from conveyor import _stack

    dt = getattr(torch, dtype)
    real_forward, real_backward = _stack.stack_forward, _stack.stack_backward
    seen = {}

    def double(a):
        return None if a is None else a.double()

    def stack_forward(cell, x, weights, h0=None, c0=None, **kwargs):
        if isinstance(x, np.ndarray):  # the float64 reference module, on NumPy views of its tensors
            return real_forward(cell, x, weights, h0, c0, **kwargs)
        seen["x"], seen["c0"] = x.dtype, c0.dtype
        weights = [tuple(double(w) for w in entry) for entry in weights]
        y, h_n, c_n, saved = real_forward(cell, x.double(), weights, h0.double(), c0.double(), **kwargs)
        return y.to(x.dtype), h_n.to(x.dtype), c_n.float(), (saved, x.dtype)

    def stack_backward(saved, dy, dh_n=None, dc_n=None, **kwargs):
        if isinstance(dy, np.ndarray):
            return real_backward(saved, dy, dh_n, dc_n, **kwargs)
        saved, x_dtype = saved
        seen["dy"], seen["dc_n"] = dy.dtype, dc_n.dtype
        g = real_backward(saved, dy.double(), dh_n.double(), dc_n.double(), **kwargs)
        weights = [type(w)(*(None if a is None else a.to(x_dtype) for a in w)) for w in g.weights]
        return _stack.StackGrads(g.dx.to(x_dtype), g.dh0.to(x_dtype), g.dc0.float(), weights)

    # What the stand-in forward saves (float64 windows and x's dtype) crosses from the forward operator to the
    # backward one as a key into this dict: the operators hand tensors over, and these are not Conveyor's own.
    stash = {}
    real_arrays, real_from_arrays = _stack.saved_arrays, _stack.saved_from_arrays

    def saved_arrays(saved):
        if not isinstance(saved, tuple):
            return real_arrays(saved)
        stash[len(stash)] = saved
        return [np.array([len(stash) - 1.0])]

    def saved_from_arrays(cell, x, weights, h0, c0, y, arrays, **kwargs):
        if isinstance(x, np.ndarray):
            return real_from_arrays(cell, x, weights, h0, c0, y, arrays, **kwargs)
        return stash[int(arrays[0][0])]

    monkeypatch.setattr(_stack, "stack_forward", stack_forward)
    monkeypatch.setattr(_stack, "stack_backward", stack_backward)
    monkeypatch.setattr(_stack, "saved_arrays", saved_arrays)
    monkeypatch.setattr(_stack, "saved_from_arrays", saved_from_arrays)
    torch.manual_seed(3)
    reference = ct.LSTM(4, 5, num_layers=2).double()
    module = ct.LSTM(4, 5, num_layers=2).to(dt)
    module.load_state_dict(reference.state_dict())
    reference.load_state_dict(module.state_dict())  # the weights as 16-bit holds them
    x = torch.randn(3, 2, 4, dtype=torch.float64).to(dt)
    h0, c0 = (torch.randn(2, 2, 5, dtype=torch.float64).to(dt).requires_grad_(with_hx) for _ in range(2))
    y, (h_n, c_n) = module(x, (h0, c0) if with_hx else None)
    assert (seen["x"], seen["c0"]) == (dt, torch.float32)
    assert (y.dtype, h_n.dtype, c_n.dtype) == (dt, dt, dt)
    y_ref, (h_ref, c_ref) = reference(x.double(), (h0.detach().double(), c0.detach().double()) if with_hx
                                      else None)
    torch.testing.assert_close(c_n, c_ref.float().to(dt), rtol=0, atol=0)  # float32 from Conveyor, then dt
    if with_hx:
        weights = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64)
        ((y.double() * weights[0]).sum() + (c_n.double() * weights[1]).sum()).backward()
        assert (seen["dy"], seen["dc_n"]) == (dt, torch.float32)
        assert c0.grad is not None and c0.grad.dtype == dt and h0.grad.dtype == dt
        c0_ref = c0.detach().double().requires_grad_(True)
        y_ref, (_, c_ref) = reference(x.double(), (h0.detach().double(), c0_ref))
        ((y_ref * weights[0].to(dt).double()).sum() + (c_ref * weights[1]).sum()).backward()
        torch.testing.assert_close(c0.grad.double(), c0_ref.grad, rtol=0.02, atol=0.02)


PACKINGS = ["pack_sequence-sorted", "pack_sequence-unsorted", "pack_padded-unsorted",
            "pack_padded-batch_first"]
PACKED_CASES = list(itertools.product(CELLS, [1, 2], [False, True], PACKINGS, [False, True]))


def packed_input(packing, lengths, gen):
    """A PackedSequence of sequences of `lengths` (3 features), made the way `packing` names, and the
    leaf tensors its gradients reach."""
    pack = torch.nn.utils.rnn
    if packing.startswith("pack_sequence"):
        sequences = [torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
                     for n in lengths]
        return pack.pack_sequence(sequences, enforce_sorted=packing.endswith("-sorted")), sequences
    batch_first = packing.endswith("batch_first")
    shape = (len(lengths), max(lengths), 3) if batch_first else (max(lengths), len(lengths), 3)
    padded = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    return pack.pack_padded_sequence(padded, torch.tensor(lengths), batch_first=batch_first,
                                     enforce_sorted=False), [padded]


@pytest.mark.parametrize(("cell", "layers", "bidirectional", "packing", "with_hx"), PACKED_CASES,
                         ids=["-".join(map(str, c)) for c in PACKED_CASES])
def test_packed_sequences_as_torch(cell, layers, bidirectional, packing, with_hx):
    """A PackedSequence in, a PackedSequence out (the input's batch_sizes and indices), h_n (c_n) in the
    batch's original order, and every gradient (the sequences', hx's, the parameters') as torch.nn's."""
    reference, module = pair(cell, 3, 5, num_layers=layers, bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(2)
    lengths = [6, 6, 5, 4, 2, 1] if packing.endswith("-sorted") else [2, 6, 1, 4, 6, 3]
    packed, leaves = packed_input(packing, lengths, gen)
    D, B = 2 if bidirectional else 1, len(lengths)
    hx = None
    if with_hx:
        states = [torch.randn(layers * D, B, units, generator=gen, dtype=torch.float64, requires_grad=True)
                  for units in ([state_units(cell, 5), 5] if is_lstm(cell) else [5])]
        leaves += states
        hx = tuple(states) if is_lstm(cell) else states[0]
    expected, got = reference(packed, hx), module(packed, hx)
    assert isinstance(got[0], torch.nn.utils.rnn.PackedSequence)
    for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        e, g = getattr(expected[0], name), getattr(got[0], name)
        assert (e is None and g is None) or torch.equal(e, g), name
    expected = (expected[0].data,) + flat_outputs(expected)[1:]
    got = (got[0].data,) + flat_outputs(got)[1:]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in expected]
    grads_e = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights)),
                                  leaves + list(reference.parameters()), retain_graph=True)  # packing: shared
    grads_g = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, weights)),
                                  leaves + list(module.parameters()))
    for e, g in zip(grads_e, grads_g):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_packed_sequences_in_inference_and_training_modes():
    """Under no_grad (the inference path) and with dropout in training mode, packed input keeps each
    sequence to its own steps: the padded outputs are those of the sequences run one by one."""
    torch.manual_seed(3)
    module = ct.GRU(3, 4, num_layers=2, bidirectional=True).double()
    sequences = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 2, 4)]
    packed = torch.nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    with torch.no_grad():
        y, h_n = module(packed)
        padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(y)
        for b, s in enumerate(sequences):
            y_alone, h_alone = module(s[:, None])
            torch.testing.assert_close(padded[:lengths[b], b], y_alone[:, 0])
            torch.testing.assert_close(h_n[:, b], h_alone[:, 0])
    dropping = ct.LSTM(3, 4, num_layers=2, dropout=0.5, recurrent_dropout=0.3).double().train()
    y, _ = dropping(packed)
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(y)
    assert torch.isfinite(y.data).all() and y.data.shape == (11, 4)
    for b, n in enumerate(lengths):
        assert not padded[n:, b].any()


def test_refusals_name_the_problem():
    m = ct.LSTM(3, 4)
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):  # torch's own check
        m(torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [3, 5], enforce_sorted=True))
    with pytest.raises(TypeError, match="input: expected a torch.Tensor or a PackedSequence, got list"):
        m([torch.randn(5, 2, 3)])
    with pytest.raises(ValueError, match="input: expected 3 features"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"hx: expected h_0 of shape \(1, 2, 4\)"):
        m(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(TypeError, match="hx: expected a tuple"):
        m(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"proj_size: expected 0 \(no projection\) or an integer from 1 to "
                                         r"hidden_size - 1 = 3, got 4"):
        ct.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match=r"hx: expected h_0 of shape \(1, 2, 2\)"):
        ct.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match=r"hx: expected c_0 of shape \(1, 2, 4\)"):
        ct.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))


def test_conveyor_imports_without_torch_and_explains_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import conveyor\n"
            "try:\n"
            "    import conveyor.torch\n"
            "except ImportError as e:\n"
            "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: conveyor.torch needs PyTorch: pip install torch" in out.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_and_16_bit_modules_on_cuda(dtype):
    """torch.autocast runs the layer in the autocast dtype, as torch.nn's; .half()/.bfloat16() modules take
    16-bit input; both within 16-bit error of torch.nn, gradients reaching the float32 parameters."""
    if not torch.cuda.is_available():
        pytest.skip("interop with PyTorch CUDA tensors needs PyTorch with a GPU")
    dt = getattr(torch, dtype)
    torch.manual_seed(7)
    reference = torch.nn.LSTM(16, 32, num_layers=2).cuda()
    module = ct.LSTM(16, 32, num_layers=2).cuda()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(10, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=dt):
        expected, got = reference(x)[0], module(x)[0]
    assert got.dtype == expected.dtype == dt
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert module.weight_ih_l0.grad is not None and module.weight_ih_l0.grad.dtype == torch.float32
    half_reference, half_module = reference.to(dt), module.to(dt)
    torch.testing.assert_close(half_module(x.to(dt))[0].float(), half_reference(x.to(dt))[0].float(),
                               atol=3e-2, rtol=3e-2)
