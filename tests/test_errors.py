"""Bad input is a Python exception, never a crash or a silently wrong result (docs/math.md, Errors).

TypeError for a wrong dtype or a wrong Python type, ValueError for a wrong shape, layout, size or option
value; the message starts with the argument's name ("x: ...", "h0: ...") and states what it got. Each case
builds a valid call with fresh random inputs and corrupts exactly one thing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import conveyor

from support import CONFIGS, GATES, config_id

T, B, I, H = 3, 2, 4, 5
CELLS = tuple(GATES)
LAYERS = {"lstm": conveyor.LSTM, "gru": conveyor.GRU, "rnn": conveyor.RNN}
CONFIG_IDS = [config_id(c) for c in CONFIGS]


# -- valid calls ------------------------------------------------------------------------------------------


def _uniform(rng, shape, dtype=np.float32):
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def forward_args(cell, rng, dtype=np.float32):
    """A valid keyword-argument dict for ``<cell>_forward``, every optional array given."""
    gh = GATES[cell] * H
    args = {"x": (T, B, I), "W": (gh, I), "R": (gh, H), "bW": (gh,), "bR": (gh,), "h0": (B, H)}
    if cell == "lstm":
        args["c0"] = (B, H)
    return {name: _uniform(rng, shape, dtype) for name, shape in args.items()}


def backward_args(cell, rng, dtype=np.float32):
    """A valid keyword-argument dict (without ``saved``) for ``<cell>_backward``."""
    args = {"dy": (T, B, H), "dh_T": (B, H)}
    if cell == "lstm":
        args["dc_T"] = (B, H)
    return {name: _uniform(rng, shape, dtype) for name, shape in args.items()}


FORWARD_NAMES = {cell: ["x", "W", "R", "bW", "bR", "h0"] + ["c0"] * (cell == "lstm") for cell in CELLS}
BACKWARD_NAMES = {cell: ["dy", "dh_T"] + ["dc_T"] * (cell == "lstm") for cell in CELLS}


def run_forward(cell, args, **options):
    """Calls ``<cell>_forward`` and returns ``(y, saved)``."""
    out = getattr(conveyor, f"{cell}_forward")(**args, **options)
    return out[0], out[-1]


def run_backward(cell, saved, args):
    return getattr(conveyor, f"{cell}_backward")(saved, **args)


def message(name, *words):
    """A regex: the message starts with ``name:`` and contains every one of ``words`` (plain text)."""
    return "^" + re.escape(name) + ":" + "".join(f"(?=.*{re.escape(w)})" for w in words)


# -- corruptions of one array argument ----------------------------------------------------------------------


def _one_more_along(axis):
    def corrupt(a, rng):
        shape = list(a.shape)
        shape[axis] += 1
        return _uniform(rng, shape, a.dtype)

    return corrupt


def _strided(a, rng):
    """Same shape and values, every other element of an array twice as long along axis 0 (like x[::2])."""
    return np.repeat(a, 2, axis=0)[::2]


# kind -> (corrupt(array, rng), exception, words the message must contain besides the argument's name; a
# callable word is applied to the corrupted value)
_SHAPE = (ValueError, ("got", lambda bad: str(bad.shape)))
CORRUPTIONS = {
    "add_axis": (lambda a, rng: a[np.newaxis], *_SHAPE),
    "drop_axis": (lambda a, rng: a.reshape(a.shape[:-2] + (-1,)) if a.ndim > 1 else a[0, ...], *_SHAPE),
    "dim0": (_one_more_along(0), *_SHAPE),
    "dim1": (_one_more_along(1), *_SHAPE),
    "dim2": (_one_more_along(2), *_SHAPE),
    "int32": (lambda a, rng: (a * 10).astype(np.int32), TypeError, ("got", "int32")),
    "int64": (lambda a, rng: (a * 10).astype(np.int64), TypeError, ("got", "int64")),
    "float16": (lambda a, rng: a.astype(np.float16), TypeError, ("got", "float16")),
    "bool": (lambda a, rng: a > 0, TypeError, ("got", "bool")),
    "transposed": (lambda a, rng: np.ascontiguousarray(a.T).T, ValueError, ("contiguous",)),
    "strided": (_strided, ValueError, ("contiguous",)),
    "reversed": (lambda a, rng: a[::-1], ValueError, ("contiguous",)),
    "list": (lambda a, rng: a.tolist(), TypeError, ("got list",)),
    "str": (lambda a, rng: "abc", TypeError, ("got str",)),
    "None": (lambda a, rng: None, TypeError, ("got NoneType",)),
}
_RANKS = {"x": 3, "W": 2, "R": 2, "bW": 1, "bR": 1, "h0": 2, "c0": 2, "dy": 3, "dh_T": 2, "dc_T": 2}
_REQUIRED = {"x", "W", "R", "dy"}


def _kinds(name):
    """The corruptions that make argument ``name`` invalid on its own."""
    rank = _RANKS[name]
    kinds = ["add_axis", "drop_axis", "int32", "int64", "float16", "bool", "strided", "reversed", "list",
             "str"]
    if name != "x":  # x's sizes define the window: any T, B, I is valid on its own
        kinds += [f"dim{d}" for d in range(rank)]
    if rank > 1:
        kinds.append("transposed")
    if name in _REQUIRED:
        kinds.append("None")
    return kinds


def _cases(names_of):
    return [pytest.param(cell, name, kind, id=f"{cell}-{name}-{kind}")
            for cell in CELLS for name in names_of(cell) for kind in _kinds(name)]


def _corrupt(args, name, kind, rng):
    corrupt, error, words = CORRUPTIONS[kind]
    args[name] = bad = corrupt(args[name], rng)
    return error, message(name, *(w(bad) if callable(w) else w for w in words))


def _only_for(cell, name):
    """Whether the option or argument ``name`` exists for ``cell`` (reset_after: GRU; c0, dc_T, dc_n:
    LSTM)."""
    owner = {"reset_after": "gru", "c0": "lstm", "dc_T": "lstm", "dc_n": "lstm"}
    return owner.get(name.split("-")[0], cell) == cell


def _option_cases(cases):
    """(cell, name, value, error) for each (name, value, error) of ``cases`` and each cell that has name."""
    return [pytest.param(cell, name, value, error, id=f"{cell}-{name}={getattr(value, '__name__', value)!r}")
            for name, value, error in cases for cell in CELLS if _only_for(cell, name)]


def _labelled_cases(*tables):
    return [pytest.param(cell, label, id=f"{cell}-{label}")
            for table in tables for label in table for cell in CELLS if _only_for(cell, label)]


# -- functional API: one bad array argument -----------------------------------------------------------------


@pytest.mark.parametrize(("cell", "name", "kind"), _cases(lambda cell: FORWARD_NAMES[cell]))
def test_forward_bad_array(cell, name, kind, rng):
    args = forward_args(cell, rng)
    error, pattern = _corrupt(args, name, kind, rng)
    with pytest.raises(error, match=pattern):
        run_forward(cell, args)


@pytest.mark.parametrize(("cell", "name", "kind"), _cases(lambda cell: BACKWARD_NAMES[cell]))
def test_backward_bad_array(cell, name, kind, rng):
    _, saved = run_forward(cell, forward_args(cell, rng))
    args = backward_args(cell, rng)
    error, pattern = _corrupt(args, name, kind, rng)
    with pytest.raises(error, match=pattern):
        run_backward(cell, saved, args)


@pytest.mark.parametrize("base", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("cell", "name"), [(cell, name) for cell in CELLS
                                            for name in FORWARD_NAMES[cell][1:] + BACKWARD_NAMES[cell]])
def test_dtype_differs_from_x(cell, name, base, rng):
    """Every array of a call has x's dtype; one float32 among float64 (or the reverse) names itself."""
    other = np.float64 if base is np.float32 else np.float32
    fwd, bwd = forward_args(cell, rng, base), backward_args(cell, rng, base)
    args = fwd if name in fwd else bwd
    args[name] = args[name].astype(other)
    pattern = message(name, "got", np.dtype(other).name, np.dtype(base).name)
    with pytest.raises(TypeError, match=pattern):
        _, saved = run_forward(cell, fwd)
        run_backward(cell, saved, bwd)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("dim", "name"), [(1, "h0"), (2, "W")], ids=["B-vs-h0", "I-vs-W"])
def test_x_disagrees_with_another_argument(cell, dim, name, rng):
    """x's B or input_size differs from h0's or W's: either of the two may be blamed, by name."""
    args = forward_args(cell, rng)
    args["x"] = _one_more_along(dim)(args["x"], rng)
    with pytest.raises(ValueError, match=f"^(x|{name}):.*got"):
        run_forward(cell, args)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("zero", ["T", "B", "I", "H"])
def test_zero_sizes(cell, zero, rng):
    sizes = {"T": T, "B": B, "I": I, "H": H, zero: 0}
    gh = GATES[cell] * sizes["H"]
    shapes = {"x": (sizes["T"], sizes["B"], sizes["I"]), "W": (gh, sizes["I"]), "R": (gh, sizes["H"]),
              "bW": (gh,), "bR": (gh,), "h0": (sizes["B"], sizes["H"])}
    if cell == "lstm":
        shapes["c0"] = shapes["h0"]
    args = {name: _uniform(rng, shape) for name, shape in shapes.items()}
    name = "R" if zero == "H" else "x"  # hidden_size is read off R
    with pytest.raises(ValueError, match=message(name, "got", str(shapes[name]))):
        run_forward(cell, args)


OPTION_CASES = [
    ("activation", "sigmoid", ValueError),
    ("activation", "TANH", ValueError),
    ("activation", "", ValueError),
    ("activation", None, TypeError),
    ("activation", 1, TypeError),
    ("training", 1, TypeError),
    ("training", "yes", TypeError),
    ("training", None, TypeError),
    ("reset_after", "yes", TypeError),
    ("reset_after", 1, TypeError),
    ("reset_after", None, TypeError),
]


@pytest.mark.parametrize(("cell", "option", "value", "error"), _option_cases(OPTION_CASES))
def test_bad_option(cell, option, value, error, rng):
    with pytest.raises(error, match=message(option, "got", repr(value))):
        run_forward(cell, forward_args(cell, rng), **{option: value})


# -- functional API: Saved misuse ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bad", [None, "saved", {"x": 1}, 0], ids=["None", "str", "dict", "int"])
def test_saved_not_a_saved(cell, bad, rng):
    with pytest.raises(TypeError, match=message("saved", "got", type(bad).__name__)):
        run_backward(cell, bad, backward_args(cell, rng))


@pytest.mark.parametrize(("made_by", "cell"), [(a, b) for a in CELLS for b in CELLS if a != b])
def test_saved_of_another_cell(made_by, cell, rng):
    _, saved = run_forward(made_by, forward_args(made_by, rng))
    with pytest.raises(ValueError, match=message("saved", f"{cell}_forward", f"{made_by}_forward")):
        run_backward(cell, saved, backward_args(cell, rng))


@pytest.mark.parametrize("cell", CELLS)
def test_saved_reused_after_backward(cell, rng):
    _, saved = run_forward(cell, forward_args(cell, rng))
    run_backward(cell, saved, backward_args(cell, rng))
    with pytest.raises(ValueError, match=message("saved", "already used")):
        run_backward(cell, saved, backward_args(cell, rng))


@pytest.mark.parametrize("cell", CELLS)
def test_backward_after_inference_forward(cell, rng):
    _, saved = run_forward(cell, forward_args(cell, rng), training=False)
    assert saved is None
    with pytest.raises(TypeError, match=message("saved", "training=True", "got NoneType")):
        run_backward(cell, saved, backward_args(cell, rng))


@pytest.mark.parametrize("cell", CELLS)
def test_rejected_backward_keeps_saved(cell, rng):
    """A backward call that rejects its arguments does not consume saved: a corrected call still works."""
    _, saved = run_forward(cell, forward_args(cell, rng))
    args = backward_args(cell, rng)
    with pytest.raises(ValueError, match=message("dy")):
        run_backward(cell, saved, {**args, "dy": args["dy"][:, :1]})
    grads = run_backward(cell, saved, args)
    assert np.all(np.isfinite(grads.dx))


# -- non-finite values and byte order -----------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "options"), CONFIGS, ids=CONFIG_IDS)
def test_nan_in_x_propagates(cell, options, rng):
    """A NaN at x[1, 0, 2] makes every later output of batch row 0 NaN (as in PyTorch: relu(NaN) = NaN);
    forward and backward return normally."""
    args = forward_args(cell, rng)
    args["x"][1, 0, 2] = np.nan
    y, saved = run_forward(cell, args, **options)
    assert y.shape == (T, B, H)
    assert np.all(np.isnan(y[1:, 0])), f"y[t >= 1, 0] should be NaN, got\n{y[1:, 0]}"
    grads = run_backward(cell, saved, backward_args(cell, rng))
    assert np.isnan(grads.dW).any()


@pytest.mark.parametrize(("cell", "options"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
def test_inf_in_x_returns(cell, options, value, rng):
    """An infinity in x neither crashes nor hangs; the steps before it are unaffected."""
    args = forward_args(cell, rng)
    clean, _ = run_forward(cell, args, training=False, **options)
    args["x"][1, 0, :] = value
    y, saved = run_forward(cell, args, **options)
    assert y.shape == (T, B, H)
    np.testing.assert_array_equal(y[0], clean[0])
    run_backward(cell, saved, backward_args(cell, rng))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", ["x", "W", "h0"])
def test_non_native_byte_order(cell, name, rng):
    """A big-endian float32 array is either refused (TypeError naming it) or read correctly; never read as
    if it were native."""
    args = forward_args(cell, rng)
    expected, _ = run_forward(cell, args, training=False)
    args[name] = args[name].astype(args[name].dtype.newbyteorder())
    try:
        y, _ = run_forward(cell, args, training=False)
    except (TypeError, ValueError) as error:
        assert isinstance(error, TypeError) and re.search(message(name, "got"), str(error)), error
    else:
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


# -- layers: constructors -----------------------------------------------------------------------------------


CONSTRUCTOR_CASES = [
    # (argument, bad value, exception)
    ("input_size", -1, ValueError),
    ("input_size", 0, ValueError),
    ("hidden_size", 0, ValueError),
    ("hidden_size", -5, ValueError),
    ("hidden_size", 2**62, ValueError),
    ("input_size", 2.5, TypeError),
    ("hidden_size", 5.0, TypeError),
    ("input_size", True, TypeError),
    ("hidden_size", "5", TypeError),
    ("input_size", None, TypeError),
    ("dtype", np.int32, TypeError),
    ("dtype", np.float16, TypeError),
    ("dtype", "not-a-dtype", TypeError),
    ("bias", 1, TypeError),
    ("bias", "yes", TypeError),
    ("activation", "sigmoid", ValueError),
    ("activation", None, TypeError),
    ("reset_after", "yes", TypeError),
]


@pytest.mark.parametrize(("cell", "name", "value", "error"), _option_cases(CONSTRUCTOR_CASES))
def test_layer_constructor(cell, name, value, error):
    kwargs = {"input_size": I, "hidden_size": H, name: value}
    with pytest.raises(error, match=message(name, "got")):
        LAYERS[cell](**kwargs)


# -- layers: forward and backward ---------------------------------------------------------------------------


def _layer(cell, dtype=np.float32):
    return LAYERS[cell](I, H, dtype=dtype, seed=0)


def _x(rng, *shape, dtype=np.float32):
    return _uniform(rng, shape or (T, B, I), dtype)


LAYER_FORWARD_CASES = {
    # label: (call(layer, rng), exception, regex)
    "x-rank2": (lambda m, rng: m(_x(rng, B, I)), ValueError, message("x", "got", str((B, I)))),
    "x-rank4": (lambda m, rng: m(_x(rng, 1, T, B, I)), ValueError, message("x", "got")),
    "x-T0": (lambda m, rng: m(_x(rng, 0, B, I)), ValueError, message("x", "got")),
    "x-list": (lambda m, rng: m(_x(rng).tolist()), TypeError, message("x", "got list")),
    "x-None": (lambda m, rng: m(None), TypeError, message("x", "got NoneType")),
    "x-int": (lambda m, rng: m(_x(rng).astype(np.int32)), TypeError, message("x", "got", "int32")),
    "x-float16": (lambda m, rng: m(_x(rng).astype(np.float16)), TypeError, message("x", "got", "float16")),
    "x-transposed": (lambda m, rng: m(np.asfortranarray(_x(rng))), ValueError, message("x", "contiguous")),
    "x-sliced": (lambda m, rng: m(_x(rng, T, 2 * B, I)[:, ::2]), ValueError, message("x", "contiguous")),
    # The layer's parameters are float32, x float64: the message must at least mention x and both dtypes.
    "x-float64": (lambda m, rng: m(_x(rng, dtype=np.float64)), TypeError,
                  r"^(?=.*\bx\b)(?=.*float64)(?=.*float32)"),
    # x's input_size is not the layer's: the message must mention x (the caller's argument), not only W.
    "x-input_size": (lambda m, rng: m(_x(rng, T, B, I + 1)), ValueError, r"^(?=.*\bx\b)(?=.*input_size)"),
    "h0-batch": (lambda m, rng: m(_x(rng), _x(rng, B + 1, H)), ValueError, message("h0", "got")),
    "h0-hidden": (lambda m, rng: m(_x(rng), _x(rng, B, H + 1)), ValueError, message("h0", "got")),
    "h0-list": (lambda m, rng: m(_x(rng), [[0.0] * H] * B), TypeError, message("h0", "got list")),
}
LSTM_FORWARD_CASES = {
    "c0-hidden": (lambda m, rng: m(_x(rng), None, _x(rng, B, H + 1)), ValueError, message("c0", "got")),
    "c0-rank1": (lambda m, rng: m(_x(rng), None, _x(rng, H)), ValueError, message("c0", "got")),
    "c0-float64": (lambda m, rng: m(_x(rng), None, _x(rng, 1, B, H, dtype=np.float64)), TypeError,
                   message("c0", "got", "float64")),
}


@pytest.mark.parametrize(("cell", "label"), _labelled_cases(LAYER_FORWARD_CASES, LSTM_FORWARD_CASES))
def test_layer_forward(cell, label, rng):
    call, error, pattern = {**LAYER_FORWARD_CASES, **LSTM_FORWARD_CASES}[label]
    with pytest.raises(error, match=pattern):
        call(_layer(cell), rng)


def _no_forward(m, rng):
    pass


def _inference_forward(m, rng):
    m.eval()
    m(_x(rng))


def _consumed_forward(m, rng):
    m(_x(rng))
    m.backward(_x(rng, T, B, H))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("before", [_no_forward, _inference_forward, _consumed_forward],
                         ids=["no-forward", "eval-forward", "second-backward"])
def test_layer_backward_without_forward(cell, before, rng):
    m = _layer(cell)
    before(m, rng)
    with pytest.raises(ValueError, match=message("backward", "forward")):
        m.backward(_x(rng, T, B, H))


LAYER_BACKWARD_CASES = {
    "dy-shape": (lambda rng: ((_x(rng, T, B + 1, H),), {}), ValueError,
                 message("dy", "got", str((T, B + 1, H)))),
    "dy-rank2": (lambda rng: ((_x(rng, B, H),), {}), ValueError, message("dy", "got")),
    "dy-None": (lambda rng: ((None,), {}), TypeError, message("dy", "got NoneType")),
    "dy-list": (lambda rng: ((_x(rng, T, B, H).tolist(),), {}), TypeError, message("dy", "got list")),
    "dy-float64": (lambda rng: ((_x(rng, T, B, H, dtype=np.float64),), {}), TypeError,
                   message("dy", "got", "float64")),
    "dy-int": (lambda rng: ((_x(rng, T, B, H).astype(np.int64),), {}), TypeError,
               message("dy", "got", "int64")),
    "dy-transposed": (lambda rng: ((np.asfortranarray(_x(rng, T, B, H)),), {}), ValueError,
                      message("dy", "contiguous")),
    # Layers take and give states of every layer and direction: [num_layers * directions, B, H].
    "dh_n-shape": (lambda rng: ((_x(rng, T, B, H),), {"dh_n": _x(rng, 1, B, H + 1)}), ValueError,
                   message("dh_n", "got")),
    "dh_n-str": (lambda rng: ((_x(rng, T, B, H),), {"dh_n": "zeros"}), TypeError, message("dh_n", "got str")),
}
LSTM_BACKWARD_CASES = {
    "dc_n-shape": (lambda rng: ((_x(rng, T, B, H),), {"dc_n": _x(rng, 1, B + 1, H)}), ValueError,
                   message("dc_n", "got")),
    "dc_n-float16": (lambda rng: ((_x(rng, T, B, H),), {"dc_n": _x(rng, 1, B, H).astype(np.float16)}),
                     TypeError, message("dc_n", "got", "float16")),
}


@pytest.mark.parametrize(("cell", "label"), _labelled_cases(LAYER_BACKWARD_CASES, LSTM_BACKWARD_CASES))
def test_layer_backward_bad_argument(cell, label, rng):
    make, error, pattern = {**LAYER_BACKWARD_CASES, **LSTM_BACKWARD_CASES}[label]
    m = _layer(cell)
    m(_x(rng))
    args, kwargs = make(rng)
    with pytest.raises(error, match=pattern):
        m.backward(*args, **kwargs)


@pytest.mark.parametrize("cell", CELLS)
def test_layer_rejected_backward_keeps_forward(cell, rng):
    """As with the functional API's saved, a backward call that rejects its arguments leaves the forward pass
    in place: the corrected call succeeds instead of reporting 'no forward pass'."""
    m = _layer(cell)
    m(_x(rng))
    with pytest.raises(ValueError, match=message("dy")):
        m.backward(_x(rng, T, B + 1, H))
    dx = m.backward(_x(rng, T, B, H))[0]
    assert dx.shape == (T, B, I)


# -- layers: state dicts ------------------------------------------------------------------------------------


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


STATE_CASES = {
    "missing": (lambda s: _drop(s, "bias_hh_l0"), message("state", "missing", "bias_hh_l0")),
    "extra": (lambda s: {**s, "weight_ih_l1": s["weight_ih_l0"]},
              message("state", "unexpected", "weight_ih_l1")),
    "wrong-shape": (lambda s: {**s, "weight_hh_l0": s["weight_hh_l0"][:-1]},
                    message("state['weight_hh_l0']", "expected shape", "got")),
    "wrong-rank": (lambda s: {**s, "bias_ih_l0": s["bias_ih_l0"][None]},
                   message("state['bias_ih_l0']", "expected shape", "got")),
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("label", list(STATE_CASES))
def test_load_state_dict_rejects(cell, label):
    """A bad state dict raises ValueError naming it and leaves the parameters unchanged."""
    m = _layer(cell)
    before = m.state_dict()
    bad, pattern = STATE_CASES[label]
    other = LAYERS[cell](I, H, seed=1).state_dict()
    with pytest.raises(ValueError, match=pattern):
        m.load_state_dict(bad(other))
    for name, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


# -- set_num_threads ----------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    n = conveyor.num_threads()
    yield n
    conveyor.set_num_threads(n)


@pytest.mark.parametrize(("value", "error"), [
    (0, ValueError),
    (-1, ValueError),
    (2**40, ValueError),
    (1.5, TypeError),
    ("2", TypeError),
    (None, TypeError),
    (True, TypeError),
], ids=["0", "-1", "2**40", "1.5", "'2'", "None", "True"])
def test_set_num_threads(value, error, restore_threads):
    with pytest.raises(error, match=message("n", "got")):
        conveyor.set_num_threads(value)
    assert conveyor.num_threads() == restore_threads


# -- crash check --------------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import numpy as np
    import conveyor

    rng = np.random.default_rng(0)
    T, B, I, H = 3, 2, 4, 5

    def u(*shape, dtype=np.float32):
        return rng.uniform(-1, 1, shape).astype(dtype)

    def lstm(x=None, W=None, R=None, **kw):
        x = u(T, B, I) if x is None else x
        W = u(4 * H, I) if W is None else W
        R = u(4 * H, H) if R is None else R
        return conveyor.lstm_forward(x, W, R, None, None, **kw)

    def saved(cell="lstm"):
        G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
        return getattr(conveyor, cell + "_forward")(u(T, B, I), u(G * H, I), u(G * H, H), None, None)[-1]

    def consumed():
        s = saved()
        conveyor.lstm_backward(s, u(T, B, H))
        return s

    calls = [
        lambda: lstm(x=u(B, I)),
        lambda: lstm(x=u(1, 1, T, B, I)),
        lambda: lstm(x=u(T, 2 * B, I)[:, ::2]),
        lambda: lstm(x=u(T, B, I)[::-1]),
        lambda: lstm(W=np.ascontiguousarray(u(I, 4 * H)).T),
        lambda: lstm(x=u(T, B, I, dtype=np.float16), W=u(4 * H, I, dtype=np.float16),
                     R=u(4 * H, H, dtype=np.float16)),
        lambda: lstm(x=u(T, B, I).astype(np.int32)),
        lambda: lstm(x=u(0, B, I)),
        lambda: lstm(x=u(T, 0, I)),
        lambda: lstm(x=u(T, B, 0), W=u(4 * H, 0)),
        lambda: lstm(W=u(0, I), R=u(0, 0)),
        lambda: lstm(h0=u(B + 1, H)),
        lambda: lstm(c0=u(B, H, dtype=np.float64)),
        lambda: lstm(x=None, W="W"),
        lambda: lstm(activation="sigmoid"),
        lambda: conveyor.gru_forward(u(T, B, I), u(3 * H, I), u(3 * H, H), None, None, reset_after="yes"),
        lambda: conveyor.lstm_backward(saved(), u(T, B + 1, H)),
        lambda: conveyor.lstm_backward(saved(), u(T, B, H), u(B, H, dtype=np.float64)),
        lambda: conveyor.lstm_backward(saved(), None),
        lambda: conveyor.gru_backward(saved("lstm"), u(T, B, H)),
        lambda: conveyor.rnn_backward(None, u(T, B, H)),
        lambda: conveyor.lstm_backward(consumed(), u(T, B, H)),
        lambda: conveyor.LSTM(I, 0),
        lambda: conveyor.GRU(I, H).backward(u(T, B, H)),
        lambda: conveyor.RNN(I, H)(u(T, B, I + 1)),
        lambda: conveyor.set_num_threads(0),
        lambda: lstm(P=u(3, H + 1)),
        lambda: lstm(cell_clip=float("nan")),
        lambda: lstm(recurrent_dropout=1.0),
        lambda: conveyor.dropout_mask(u(1), (T, B), 0.5),
        lambda: conveyor.dropout_mask(u(1), (T, B, H), -0.1),
        lambda: conveyor.clip_grad_norm([u(2)], 0.0),
        lambda: conveyor.clip_grad_norm("grads", 1.0),
        lambda: conveyor.stack_forward("lstm", u(T, B, I), [], num_layers=1),
        lambda: conveyor.stack_forward("lstm", u(T, B, I), conveyor.LSTM(I, H)._weights(), h0=u(B, H)),
        lambda: conveyor.TBPTT(conveyor.GRU(I, H), 3, 2),
        lambda: conveyor.TBPTT(conveyor.GRU(I, H), 3).backward(u(3, B, H)),
        lambda: conveyor.LSTM(I, H, num_layers=2, bidirectional=True)(u(T, B, I), u(1, B, H)),
    ]
    not_raised = []
    for index, call in enumerate(calls):
        try:
            call()
        except (TypeError, ValueError):
            continue
        not_raised.append(index)
    print("not raised:", not_raised)
""")


def test_bad_calls_do_not_crash_the_interpreter():
    """The bad calls above in a fresh interpreter: a segfault or abort fails this test, not pytest."""
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "not raised: []" in result.stdout, result.stdout


HUGE_X_SCRIPT = textwrap.dedent("""
    import numpy as np
    import conveyor

    x = np.broadcast_to(np.ones((1, 1, 4), np.float32), (10**6, 10**3, 4))
    try:
        conveyor.lstm_forward(x, np.ones((20, 4), np.float32), np.ones((20, 5), np.float32), None, None)
    except Exception as error:
        print(type(error).__name__, error)
""")


def test_huge_non_contiguous_x_is_rejected_before_allocating():
    """Every argument is checked before the outputs are allocated: a zero-stride view standing for a
    10^6 x 10^3 window is a ValueError naming x (not contiguous), not a MemoryError from allocating ~100 GiB
    of outputs first. In a fresh interpreter, where outputs are not poisoned (filling them would touch all of
    that memory where the allocation succeeds)."""
    result = subprocess.run([sys.executable, "-c", HUGE_X_SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert re.match(r"ValueError x:.*contiguous", result.stdout), result.stdout
