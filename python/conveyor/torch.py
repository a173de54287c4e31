"""PyTorch drop-in: ``conveyor.torch.LSTM``, ``GRU`` and ``RNN``.

Replace ``torch.nn.LSTM(...)`` with ``conveyor.torch.LSTM(...)``: the constructor arguments, the forward
signature (``input, hx`` in; ``output, h_n`` or ``output, (h_n, c_n)`` out), ``batch_first``, unbatched
input, the parameter names, shapes and initialisation are PyTorch's, so ``load_state_dict`` of a torch model
works unchanged and gives the same outputs and gradients. Conveyor's variants are extra keyword arguments:
``peephole``, ``coupled_gates``, ``forget_bias``, ``cell_clip``, ``activation`` (LSTM/GRU; the RNN keeps
``nonlinearity``), ``reset_after`` (GRU), ``variational`` and ``recurrent_dropout``.

A call is one PyTorch custom operator, ``conveyor::stack_forward``, whose backward is another,
``conveyor::stack_backward`` (``torch.library``, with fake implementations that give every output's shape):
they run Conveyor's window kernels on the tensors' memory (NumPy views on the CPU, DLPack on a GPU, no
copies), on the tensors' device and the current CUDA stream, and the forward returns what the backward needs
(each window's output and gate cache, each layer's dropout mask) as tensors that autograd saves. So
``torch.compile`` (``fullgraph=True`` included), ``torch.export`` and ``torch.jit.trace`` see the layer as a
node of the graph, not a break. Double backward is refused with a message. Under ``torch.autocast`` on CUDA
the layer runs in the autocast dtype, as torch.nn's RNNs do. Parameters are ordinary
``nn.Parameter``s, so optimisers, ``DistributedDataParallel`` and ``state_dict`` treat them as any other; the
attributes torch.nn's RNNs have for the code around them (``_flat_weights``, ``_flat_weights_names``,
``all_weights``, ``flatten_parameters()``, ``extra_repr``) are there too.

Cell state in float16 and bfloat16: Conveyor keeps the LSTM's cell state in float32 beside 16-bit storage
and takes and returns it as float32 (``conveyor.lstm_forward``'s ``c0`` and ``c_T``). ``conveyor.torch.LSTM``
keeps ``torch.nn.LSTM``'s dtypes instead: it takes ``c_0`` in the input's dtype, converts it to float32
before calling Conveyor, and returns ``c_n`` converted back to the input's dtype (a ``c_0`` already float32
is taken as it is). The conversions are ordinary torch ops, so gradients reach ``c_0`` in its own dtype.
Windows chained through a 16-bit ``c_n`` therefore see the cell state rounded to 16 bits between calls; for
exact chaining use ``conveyor.lstm_forward``, whose float32 ``c_T`` hands the state on unrounded.

``PackedSequence`` input (``pack_sequence``, ``pack_padded_sequence``, sorted or not) is taken as
``torch.nn`` takes it, returning a ``PackedSequence`` with the input's ``batch_sizes`` and indices, and
``h_n`` (``c_n``) holding each sequence's state after its last step, in the batch's original order (as is
``hx``). Each sequence runs only its own steps, in both directions, and padded steps cost no arithmetic
(``conveyor.lstm_forward``'s ``lengths``).
"""

from __future__ import annotations

import ast
import functools
import math
import operator

try:
    import torch
except ImportError as error:  # the extra is optional: say how to get it
    raise ImportError("conveyor.torch needs PyTorch: pip install torch (or, from a checkout of Conveyor, "
                      "pip install '.[torch]')") from error

from . import _conveyor, _functional, _stack

__all__ = ["GRU", "LSTM", "RNN"]

# In a PyTorch program the CPU backend works on torch's OpenMP threads rather than on a pool of its own,
# which would share cores with those threads while they spin after each torch operator
# (conveyor.share_openmp_threads).
_conveyor.share_openmp_threads(True)


def _as_numpy(t):
    """A CPU float32/float64 tensor as a NumPy array on its memory (None and empty stay as they are):
    NumPy arrays take Conveyor's direct path, which skips the per-tensor DLPack export (a few microseconds
    each in Python, a dozen tensors a call)."""
    return t if t is None else t.detach().numpy()


def _numpy_path(x, *others) -> bool:
    """Whether a call takes NumPy views: float32/float64 x with every tensor on the CPU (mixed devices go
    the DLPack way, whose checks name the tensor on the wrong device)."""
    if not (x.is_cpu and x.dtype in (torch.float32, torch.float64)):
        return False
    for t in others:
        if t is not None and not t.is_cpu:
            return False
    return True


def _as_tensor(a):
    return a if a is None or isinstance(a, torch.Tensor) else torch.from_numpy(a)


def _unflatten(layout, flat, convert):
    """The per-(layer, direction) weight tuples of stack_forward from the flat tensors (None or empty:
    absent)."""
    weights, k = [], 0
    for count in layout:
        weights.append(tuple(None if t is None or t.numel() == 0 else convert(t) for t in flat[k:k + count]))
        k += count
    return weights


def _stack_forward(spec, x, h0, c0, flat, training, **extra):
    """stack_forward on the tensors, through NumPy views on the CPU: (y, h_n, c_n or None, saved)."""
    cell, layout, kwargs = spec
    lstm = cell == "lstm"
    convert = _as_numpy if _numpy_path(x, h0, c0, *flat) else torch.Tensor.detach
    weights = _unflatten(layout, flat, convert)
    y, h_n, c_n, saved = _stack.stack_forward(cell, convert(x), weights, convert(h0),
                                              convert(c0) if lstm else None, training=training, **kwargs,
                                              **extra)
    return _as_tensor(y), _as_tensor(h_n), _as_tensor(c_n), saved


# ---------------------------------------------------------------------------------------------------------
# The custom operators. A layer's call is one operator, conveyor::stack_forward, with its backward another,
# conveyor::stack_backward, joined by torch.library.register_autograd: torch.compile and torch.export see
# them as nodes of the graph (fake implementations give every output's shape), not as a graph break. What
# the backward needs beyond the inputs and y comes out of the forward as tensors too (`reserve`: each
# window's output and cache, each layer's dropout mask; _stack.saved_arrays), so that autograd and the
# compilers hold them as they hold any saved tensor. `spec` is the layer's configuration as JSON.


def _spec(cell, layout, kwargs, training) -> str:
    """The configuration as the operators' string argument: `name=repr(value)` fields joined by ';', built by
    string formatting alone, which torch.compile traces (json.dumps it does not)."""
    fields = [f"cell={cell!r}", f"layout={tuple(layout)!r}", f"training={training!r}"]
    fields += [f"{key}={kwargs[key]!r}" for key in sorted(kwargs)]
    return ";".join(fields)


@functools.lru_cache(maxsize=256)
def _decode(spec: str):
    """_spec's fields back (cached: a layer sends the same few strings call after call; callers copy the
    keyword dict before changing it)."""
    fields = dict(field.split("=", 1) for field in spec.split(";"))
    values = {key: ast.literal_eval(value) for key, value in fields.items()}
    cell, layout, training = values.pop("cell"), values.pop("layout"), values.pop("training")
    return cell, layout, values, training


def _extra(seed, lengths):
    """The stack's arguments that come as tensors: the dropout seed and the lengths of packed input."""
    extra = {"seed": int(seed.item())}
    if lengths is not None:
        extra.update(lengths=lengths.numpy(), _packed=True)
    return extra


def _empty_like(x):
    return x.new_empty(0)


def _forward_impl(x, h0, c0, weights, seed, lengths, spec):
    """The forward operator's body: (y, h_n, c_n, reserve)."""
    cell, layout, kwargs, training = _decode(spec)
    y, h_n, c_n, saved = _stack_forward((cell, layout, kwargs), x, h0, c0, weights, training,
                                        **_extra(seed, lengths))
    reserve = [] if saved is None else [_empty_like(x) if a is None else _as_tensor(a)
                                        for a in _stack.saved_arrays(saved)]
    return y, h_n, c_n if c_n is not None else _empty_like(x), reserve


@torch.library.custom_op("conveyor::stack_forward", mutates_args=())
def _forward_op(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: list[torch.Tensor],
                seed: torch.Tensor, lengths: torch.Tensor | None, spec: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return _forward_impl(x, h0, c0, weights, seed, lengths, spec)


@_forward_op.register_fake
def _(x, h0, c0, weights, seed, lengths, spec):
    cell, layout, kwargs, training = _decode(spec)
    layers, directions = kwargs["num_layers"], 2 if kwargs["bidirectional"] else 1
    hidden = weights[1].shape[-1]  # the units of h: proj_size with a projection
    projection = weights[5] if cell == "lstm" else None  # weight_hr_l0, empty without a projection
    cell_units = projection.shape[-1] if projection is not None and projection.numel() > 0 else hidden
    gains = weights[layout[0] - (4 if cell == "lstm" else 2)] if cell != "rnn" else None  # layernorm_x_l0
    layer_norm = gains is not None and gains.numel() > 0

    def per_step(width):
        return x.new_empty(tuple(x.shape[:-1]) + (width,))

    reserve = []
    if training:  # as _stack.saved_arrays lists them
        gates = weights[0].shape[0] // cell_units
        columns = {"lstm": 6 if kwargs.get("zoneout_cell") else 5, "gru": 4, "rnn": 0}[cell]
        cache = (columns + (2 * gates if layer_norm else 0)) * cell_units  # cache_width (conveyor.h)
        for k in range(layers * directions):
            last = directions == 1 and k // directions == layers - 1
            reserve += [x.new_empty(0) if last else per_step(hidden),
                        per_step(cache) if cache else x.new_empty(0)]
        dropping = kwargs["dropout"] > 0
        reserve += [per_step(directions * hidden) if dropping and layer < layers - 1 else x.new_empty(0)
                    for layer in range(layers)]
    return per_step(directions * hidden), h0.new_empty(h0.shape), c0.new_empty(c0.shape), reserve


def _backward_impl(dy, dh_n, dc_n, x, h0, c0, weights, seed, lengths, y, reserve, spec):
    """The backward operator's body: (dx, dh0, dc0, the weights' gradients)."""
    cell, layout, kwargs, _ = _decode(spec)
    lstm = cell == "lstm"
    tensors = (x, h0, c0, y, dy, dh_n, dc_n, *weights, *reserve)
    convert = _as_numpy if _numpy_path(*tensors) else torch.Tensor.detach
    stack_weights = _unflatten(layout, weights, convert)
    arrays = [None if a.numel() == 0 else convert(a) for a in reserve]
    saved = _stack.saved_from_arrays(cell, convert(x), stack_weights, convert(h0),
                                     convert(c0) if lstm else None, convert(y), arrays, **kwargs,
                                     **_extra(seed, lengths))
    return _stack_grads(cell, layout, saved, convert, dy, dh_n, dc_n, c0, weights)


def _stack_grads(cell, layout, saved, convert, dy, dh_n, dc_n, c0, weights, keep=False):
    """stack_backward on the tensors: (dx, dh0, dc0, the weights' gradients in their flat order; zeros
    for absent ones given as empty tensors, None for those given as None)."""
    lstm = cell == "lstm"
    grads = _stack.stack_backward(saved, convert(dy.contiguous()), convert(dh_n.contiguous()),
                                  convert(dc_n.contiguous()) if lstm else None, _keep=keep)
    flat = []
    for g, count in zip(grads.weights, layout):
        parts = [g.dW, g.dR, g.dbW, g.dbR]
        if lstm:
            parts += [g.dP, g.dW_hr, *(g.dlayer_norm or (None,) * 4)]
        elif cell == "gru":
            parts += list(g.dlayer_norm or (None,) * 2)
        flat += parts[:count]
    flat = [_as_tensor(g) if g is not None else None if w is None else torch.zeros_like(w)
            for g, w in zip(flat, weights)]
    dc0 = _as_tensor(grads.dc0) if lstm else None if c0 is None else torch.zeros_like(c0)
    return _as_tensor(grads.dx), _as_tensor(grads.dh0), dc0, flat


@torch.library.custom_op("conveyor::stack_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, x: torch.Tensor, h0: torch.Tensor,
                 c0: torch.Tensor, weights: list[torch.Tensor], seed: torch.Tensor,
                 lengths: torch.Tensor | None, y: torch.Tensor, reserve: list[torch.Tensor], spec: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return _backward_impl(dy, dh_n, dc_n, x, h0, c0, weights, seed, lengths, y, reserve, spec)


@_backward_op.register_fake
def _(dy, dh_n, dc_n, x, h0, c0, weights, seed, lengths, y, reserve, spec):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            [torch.empty_like(w) for w in weights])


def _setup_context(ctx, inputs, output):
    x, h0, c0, weights, seed, lengths, spec = inputs
    y, _, _, reserve = output
    ctx.spec, ctx.counts, ctx.has_lengths = spec, (len(weights), len(reserve)), lengths is not None
    ctx.save_for_backward(x, h0, c0, seed, y, *weights, *reserve, *([lengths] if lengths is not None else []))


def _backward(ctx, dy, dh_n, dc_n, d_reserve):
    x, h0, c0, seed, y, *rest = ctx.saved_tensors
    count, reserve_count = ctx.counts
    weights, reserve = rest[:count], rest[count:count + reserve_count]
    lengths = rest[-1] if ctx.has_lengths else None
    dx, dh0, dc0, d_weights = torch.ops.conveyor.stack_backward(dy, dh_n, dc_n, x, h0, c0, list(weights),
                                                                seed, lengths, y, list(reserve), ctx.spec)
    return dx, dh0, dc0, list(d_weights), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


_DOUBLE_BACKWARD = ("conveyor: double backward (the gradient of a gradient through a Conveyor layer) is not "
                    "supported; use torch.nn's RNNs where second derivatives are needed")


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


def _setup_nothing(ctx, inputs, output):
    pass


_backward_op.register_autograd(_no_double_backward, setup_context=_setup_nothing)


# Eager calls skip the operators: their dispatch (the dynamo and autograd wrappers of torch.library) cost
# 60 µs a call, a fifth of a 100-step streaming window, and handing the saved windows out as tensors and
# rebuilding them in the backward 80 µs more. An autograd.Function keeps the stack's saved state as it is;
# compiling, exporting and tracing use the operators.


class _RefuseDoubleBackward(torch.autograd.Function):
    """The identity on an eager backward's gradients, whose own backward refuses (_DOUBLE_BACKWARD)."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(None if t is None else t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD)


class _EagerStack(torch.autograd.Function):
    """An eager training call: through a cached plan (`plan`, `layout`: CPU float32/float64, where h0, c0 and
    the absent options' weights may be None) or, elsewhere, through `spec`."""

    @staticmethod
    def forward(ctx, plan, layout, spec, seed, lengths, x, h0, c0, *weights):
        if plan is not None:
            y, h_n, c_n, saved = _run_plan(plan, x, h0, c0, seed, lengths)
            cell = plan.cell
        else:
            cell, layout, kwargs, training = _decode(spec)
            y, h_n, c_n, saved = _stack_forward((cell, layout, kwargs), x, h0, c0, weights, training,
                                                **_extra(seed, lengths))
        ctx.cell, ctx.layout, ctx.saved_stack = cell, layout, saved
        ctx.numpy = plan is not None or _numpy_path(x, h0, c0, *weights)
        ctx.save_for_backward(x, h0, c0, *weights)
        return y, h_n, c_n if c_n is not None else _empty_like(x)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, *weights = ctx.saved_tensors
        convert = _as_numpy if ctx.numpy else torch.Tensor.detach
        # Kept (not consumed): autograd may run this backward more than once with retain_graph.
        with torch.no_grad():
            dx, dh0, dc0, d_weights = _stack_grads(ctx.cell, ctx.layout, ctx.saved_stack, convert, dy, dh_n,
                                                   dc_n, c0, weights, keep=True)
        grads = (dx, None if h0 is None else dh0, None if c0 is None else dc0, *d_weights)
        if torch.is_grad_enabled():  # create_graph: a gradient of these would be wrong, so it is refused
            inputs = (dy, x, h0, c0, *weights)
            anchor = next((t for t in inputs if t is not None and t.requires_grad), dy)  # joins the graph
            grads = _RefuseDoubleBackward.apply(anchor, *grads)[1:]
        return (None, None, None, None, None, *grads)


def _run_plan(plan, x, h0, c0, seed, lengths):
    """A cached StackPlan on CPU tensors, through NumPy views: (y, h_n, c_n or None, saved)."""
    packed = lengths is not None
    x = (x.detach() if x.requires_grad else x).numpy()
    h0 = None if h0 is None else _as_numpy(h0)
    c0 = None if c0 is None else _as_numpy(c0)
    y, h_n, c_n, saved = plan.run(x, h0, c0, seed=seed, lengths=lengths.numpy() if packed else None,
                                  _packed=packed)
    return torch.from_numpy(y), torch.from_numpy(h_n), None if c_n is None else torch.from_numpy(c_n), saved


def _run_stack(x, h0, c0, flat, seed, lengths, spec):
    """One call: the operator where torch compiles, exports or traces, else its bodies directly."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        y, h_n, c_n, _ = torch.ops.conveyor.stack_forward(x, h0, c0, flat, seed, lengths, spec)
        return y, h_n, c_n
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, *flat)):
        return _EagerStack.apply(None, None, spec, seed, lengths, x, h0, c0, *flat)
    y, h_n, c_n, _ = _forward_impl(x, h0, c0, flat, seed, lengths, spec)
    return y, h_n, c_n


class _ConveyorRNNBase(torch.nn.Module):
    _cell = ""
    _gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, activation="tanh", variational=False,
                 recurrent_dropout=0.0, cell_options=None, peephole=False, algorithm="auto", proj_size=0,
                 layer_norm=False):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size: expected 0 (no projection) or an integer from 1 to hidden_size - 1 "
                             f"= {hidden_size - 1}, got {proj_size!r}")
        self.proj_size = proj_size
        units = proj_size or hidden_size  # of h and of each direction's output
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional = bool(bidirectional)
        self.activation = activation
        self.variational, self.recurrent_dropout = bool(variational), float(recurrent_dropout)
        self.peephole = bool(peephole)
        self.layer_norm = bool(layer_norm)
        self._cell_options = dict(cell_options or {})
        if _functional.check_algorithm(algorithm) != "auto":
            self._cell_options["algorithm"] = algorithm
        gates = 3 if self._cell_options.get("coupled_gates") else self._gates
        factory = {"device": device, "dtype": dtype}
        directions = 2 if self.bidirectional else 1
        self._layout = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else directions * units
            for suffix in ("", "_reverse")[:directions]:
                names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
                self.register_parameter(names[0], torch.nn.Parameter(
                    torch.empty(gates * hidden_size, layer_input, **factory)))
                self.register_parameter(names[1], torch.nn.Parameter(
                    torch.empty(gates * hidden_size, units, **factory)))
                for name in (f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"):
                    names.append(name)
                    if self.bias:
                        self.register_parameter(name, torch.nn.Parameter(torch.empty(gates * hidden_size,
                                                                                     **factory)))
                    else:
                        self.register_parameter(name, None)
                if self._cell == "lstm":
                    name = f"weight_peephole_l{layer}{suffix}"
                    names.append(name)
                    self.register_parameter(name, torch.nn.Parameter(torch.empty(3, hidden_size, **factory))
                                            if self.peephole else None)
                    name = f"weight_hr_l{layer}{suffix}"  # torch.nn's name and place (after the biases)
                    names.append(name)
                    self.register_parameter(name, torch.nn.Parameter(torch.empty(proj_size, hidden_size,
                                                                                 **factory))
                                            if proj_size else None)
                if self._cell != "rnn":  # the layer-norm gains (docs/math.md, "Regularisers"), Haste's names
                    sizes = {"x": gates * hidden_size, "h": gates * hidden_size}
                    if self._cell == "lstm":
                        sizes.update(c_weight=hidden_size, c_bias=hidden_size)
                    for gain, size in sizes.items():
                        name = f"layernorm_{gain}_l{layer}{suffix}"
                        names.append(name)
                        self.register_parameter(name, torch.nn.Parameter(torch.empty(size, **factory))
                                                if self.layer_norm else None)
                self._layout.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every weight, as PyTorch's RNNs; layer-norm gains
        1 and biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, p in self.named_parameters():
            if name.startswith("layernorm_"):
                torch.nn.init.constant_(p, 0.0 if name.startswith("layernorm_c_bias") else 1.0)
            else:
                torch.nn.init.uniform_(p, -bound, bound)

    def _options(self):
        return {"activation": self.activation, **self._cell_options}

    # -- the attributes of torch.nn.RNNBase that models and tools read -------------------------------------
    @property
    def _all_weights(self) -> list:
        """The parameter names of each layer and direction, as torch.nn's (absent biases left out)."""
        return [[name for name in names if getattr(self, name) is not None] for names in self._layout]

    @property
    def _flat_weights_names(self) -> list:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op, kept for code written for torch.nn: Conveyor reads every parameter where it lies, so there
        is no flat weight buffer (cuDNN's) to rebuild after the parameters move."""

    # -- a call ----------------------------------------------------------------------------------------------
    def _stack_options(self, training) -> dict:
        """The stack's keyword arguments for a call in this mode (the dropouts in training only)."""
        kwargs = dict(num_layers=self.num_layers, bidirectional=self.bidirectional,
                      dropout=self.dropout if training else 0.0, variational=self.variational,
                      recurrent_dropout=self.recurrent_dropout if training else 0.0, **self._options())
        if not training:
            kwargs.pop("weight_dropout", None)
        if "zoneout" in kwargs or "zoneout_cell" in kwargs:
            kwargs["_zoneout_sample"] = training  # the kernels may save for a backward in evaluation too
        return kwargs

    @property
    def _flat_getter(self) -> operator.itemgetter:
        """Every parameter of _layout_names from a dict of parameters, as a tuple: made once."""
        getter = self.__dict__.get("_flat_getter_cache")
        if getter is None:  # at least W, R, bW and bR: itemgetter returns a tuple from two names up
            getter = self.__dict__["_flat_getter_cache"] = operator.itemgetter(*self._layout_names)
        return getter

    @property
    def _layout_names(self) -> list:
        """Every name of _layout in order, flat: made once (a call reads it), and made again for a module
        unpickled from a version that did not keep it."""
        names = self.__dict__.get("_layout_names_cache")
        if names is None:
            names = self.__dict__["_layout_names_cache"] = [name for names in self._layout for name in names]
        return names

    @property
    def _weight_counts(self) -> list:
        """How many of the flat parameters (absent ones included) each layer and direction has."""
        return [len(names) for names in self._layout]

    def _plan(self, training, saving, flat) -> _stack.StackPlan | None:
        """The StackPlan of a CPU call in this mode, on NumPy views of the parameters (None where one is not
        on the CPU): made once, and kept while every parameter stays where it is, since the checks and option
        building of a call cost more than the kernels of a small one. A view keeps its tensor's memory alive,
        so a parameter at the same address is the same memory; when any address changes (.to(), .double(), a
        parameter assigned anew) every plan is dropped, so that none keeps old weights alive."""
        addresses = [0 if p is None else p.data_ptr() for p in flat]
        cache = self.__dict__.get("_plans")
        if cache is None or cache[0] != addresses:
            self.__dict__.pop("_plans", None)
            if not all(p is None or p.is_cpu for p in flat):
                return None
            cache = self.__dict__["_plans"] = (addresses, {})
        options = self.__dict__.get("_cell_options_key")  # the cell's options are fixed when it is made
        if options is None:
            options = self.__dict__["_cell_options_key"] = tuple(self._cell_options.items())
        key = (training, saving, self.num_layers, self.bidirectional, self.dropout, self.variational,
               self.recurrent_dropout, self.activation, options)
        plan = cache[1].get(key)
        if plan is None:
            weights = _unflatten(self._weight_counts, flat, _as_numpy)
            plan = cache[1][key] = _stack.StackPlan(self._cell, weights, training=saving,
                                                    **self._stack_options(training))
        return plan

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_plans", None)  # the parameters move: the plans' views would keep the old memory
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles leave the plans (views of this module's memory) behind
        state = super().__getstate__().copy()
        state.pop("_plans", None)
        return state

    def _state_layout(self, batch, dtype) -> tuple:
        """h_0's and c_0's shapes, and the dtype of Conveyor's cell state: float32 beside 16-bit x
        (torch.nn.LSTM's c_0 and c_n have x's dtype). Made only where a call needs them: a call through a plan
        without hx does not."""
        states = self.num_layers * (2 if self.bidirectional else 1)
        cell_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        state_shape = (states, batch, self.proj_size or self.hidden_size)
        return state_shape, (states, batch, self.hidden_size), cell_dtype

    def forward(self, input, hx=None):  # noqa: A002 (PyTorch's argument name)
        sequence, lengths = None, None
        if isinstance(input, torch.nn.utils.rnn.PackedSequence):
            # The kernels run on the sequence's data as it is laid out (ForwardArgs::packed): its rows sorted
            # longest first, time-major whatever batch_first says, as torch.nn reads a PackedSequence; hx and
            # h_n are permuted to and from that order.
            sequence = input
            x = sequence.data.contiguous()
            batch_sizes = sequence.batch_sizes
            lengths = (torch.arange(int(batch_sizes[0]))[None, :] < batch_sizes[:, None]).sum(0)
            batched, batch = True, int(batch_sizes[0])
            if x.dim() != 2:
                raise ValueError(f"input: expected a PackedSequence of [tokens, features] data, got data of "
                                 f"shape {tuple(x.shape)}")
        elif not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor or a PackedSequence, got {type(input).__name__}")
        else:
            dims = input.dim()
            batched = dims == 3
            if dims not in (2, 3):
                raise ValueError(f"input: expected a 2-D (unbatched) or 3-D tensor, got shape "
                                 f"{tuple(input.shape)}")
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            x = x.contiguous()
            batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input: expected {self.input_size} features (input_size), got shape "
                             f"{tuple(x.shape)}")
        # Under torch.autocast on CUDA, torch.nn's RNNs run in the autocast dtype: so does this layer (x, h_0
        # and the weights cast by torch ops, so gradients reach them in their own dtypes; c in float32).
        autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
        if autocast:
            x = x.to(torch.get_autocast_dtype("cuda"))
        lstm = self._cell == "lstm"
        h0 = c0 = None  # zeros
        if hx is not None:
            state_shape, cell_shape, cell_dtype = self._state_layout(batch, x.dtype)
            if lstm:
                if not (isinstance(hx, tuple) and len(hx) == 2):
                    raise TypeError("hx: expected a tuple (h_0, c_0) for an LSTM")
                h0, c0 = hx
            else:
                h0 = hx
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if lstm else c0
            checks = (("h_0", h0, state_shape),) + ((("c_0", c0, cell_shape),) if lstm else ())
            for name, state, shape in checks:
                if tuple(state.shape) != shape:
                    raise ValueError(f"hx: expected {name} of shape {shape}, got {tuple(state.shape)}")
            h0, c0 = h0.contiguous(), c0.contiguous() if lstm else None
            if sequence is not None and sequence.sorted_indices is not None:
                h0 = h0.index_select(1, sequence.sorted_indices)
                c0 = c0.index_select(1, sequence.sorted_indices) if lstm else c0
            if autocast:
                h0 = h0.to(x.dtype)
            if lstm and c0.dtype == x.dtype != cell_dtype:
                c0 = c0.to(cell_dtype)  # a torch op: autograd converts dc_0 back to c_0's dtype
        training = self.training
        # None: an option that is off. Where a name is not a registered parameter (torch.nn.utils.parametrize,
        # weight_norm, AWD-LSTM's weight drop), the module's attribute is the weight: getattr finds it.
        parameters = self._parameters
        try:  # one C call where every name is a registered parameter (None for an option that is off)
            flat = self._flat_getter(parameters)
        except KeyError:
            flat = [parameters[name] if name in parameters else getattr(self, name)
                    for name in self._layout_names]
        # Training-mode calls keep what the backward needs whenever a gradient may be asked for, and always
        # with dropout (its masks are drawn in training mode only); otherwise the kernels save nothing.
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (x, h0, c0, *flat))
        options = self._cell_options  # the regularisers' masks are drawn in training mode only
        dropping = training and (self.dropout > 0 or self.recurrent_dropout > 0 or "weight_dropout" in options
                                 or "zoneout" in options or "zoneout_cell" in options)
        tracing = torch.jit.is_tracing()
        # torch.jit.trace checks a trace by a second run without gradients: a trace follows the module's mode.
        saving = (training if tracing else needs_grad) or dropping
        plan = None
        if not (autocast or tracing or torch.compiler.is_compiling()) and _numpy_path(x, h0, c0):
            plan = self._plan(training, saving, flat)  # None: a parameter not on the CPU
        if plan is not None:
            seed = int(torch.randint(0, 2**62, (1,))) if dropping else 0
            if needs_grad:
                y, h_n, c_n = _EagerStack.apply(plan, self._weight_counts, None, seed, lengths, x, h0, c0,
                                                *flat)
            else:
                y, h_n, c_n, _ = _run_plan(plan, x, h0, c0, seed, lengths)
        else:
            state_shape, cell_shape, cell_dtype = self._state_layout(batch, x.dtype)
            if h0 is None:
                h0 = x.new_zeros(state_shape)
                c0 = x.new_zeros(cell_shape, dtype=cell_dtype) if lstm else None
            if c0 is None:
                c0 = x.new_empty(0)
            absent = x.new_empty(0)  # one empty tensor for every option that is off
            flat = [absent if p is None else p.to(x.dtype) if autocast else p for p in flat]
            seed = torch.randint(0, 2**62, (1,)) if dropping else torch.zeros(1, dtype=torch.int64)
            spec = _spec(self._cell, self._weight_counts, self._stack_options(training), saving)
            y, h_n, c_n = _run_stack(x, h0, c0, flat, seed, lengths, spec)
        if lstm and c_n.dtype != x.dtype:
            c_n = c_n.to(x.dtype)  # torch.nn.LSTM's c_n dtype; autograd takes dc_n back to float32
        if sequence is not None:
            y = torch.nn.utils.rnn.PackedSequence(y, sequence.batch_sizes, sequence.sorted_indices,
                                                  sequence.unsorted_indices)
            if sequence.unsorted_indices is not None:
                h_n = h_n.index_select(1, sequence.unsorted_indices)
                c_n = c_n.index_select(1, sequence.unsorted_indices) if lstm else c_n
            return (y, (h_n, c_n)) if lstm else (y, h_n)
        if batched and self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y, h_n = y.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else c_n
        return (y, (h_n, c_n)) if lstm else (y, h_n)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        defaults = (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                    ("variational", False), ("recurrent_dropout", 0.0), ("peephole", False),
                    ("layer_norm", False))
        for name, default in defaults:
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        if self.activation != "tanh" and self._cell != "rnn":  # torch.nn.RNN shows no nonlinearity
            text += f", activation={self.activation!r}"
        for key, value in self._cell_options.items():
            if (key, value) != ("reset_after", True):  # the GRU's default: torch.nn's repr has no such option
                text += f", {key}={value!r}"
        return text


class LSTM(_ConveyorRNNBase):
    """``torch.nn.LSTM`` with Conveyor's kernels; extra options ``peephole``, ``coupled_gates``,
    ``forget_bias``, ``cell_clip``, ``activation``, ``variational``, ``recurrent_dropout``, ``algorithm``, and
    the regularisers ``layer_norm`` (parameters ``layernorm_x_l{k}``, ``layernorm_h_l{k}``,
    ``layernorm_c_weight_l{k}``, ``layernorm_c_bias_l{k}``), ``weight_dropout``, ``zoneout``,
    ``zoneout_cell``."""

    _cell, _gates = "lstm", 4

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, peephole=False,
                 coupled_gates=False, forget_bias=0.0, cell_clip=None, activation="tanh", variational=False,
                 recurrent_dropout=0.0, algorithm="auto", layer_norm=False, weight_dropout=0.0, zoneout=0.0,
                 zoneout_cell=0.0):
        options = _regularisers(weight_dropout=weight_dropout, zoneout=zoneout, zoneout_cell=zoneout_cell)
        if coupled_gates:
            options["coupled_gates"] = True
        if forget_bias:
            options["forget_bias"] = float(forget_bias)
        if cell_clip is not None:
            options["cell_clip"] = float(cell_clip)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, activation=activation, variational=variational,
                         recurrent_dropout=recurrent_dropout, cell_options=options, peephole=peephole,
                         algorithm=algorithm, proj_size=proj_size, layer_norm=layer_norm)


class GRU(_ConveyorRNNBase):
    """``torch.nn.GRU`` with Conveyor's kernels; extra options ``reset_after`` (False: Cho et al. 2014),
    ``activation``, ``variational``, ``recurrent_dropout``, ``algorithm``, ``layer_norm`` (reset_after only;
    ``layernorm_x_l{k}``, ``layernorm_h_l{k}``), ``weight_dropout``, ``zoneout``."""

    _cell, _gates = "gru", 3

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, reset_after=True, activation="tanh",
                 variational=False, recurrent_dropout=0.0, algorithm="auto", layer_norm=False,
                 weight_dropout=0.0, zoneout=0.0):
        if layer_norm and not reset_after:
            raise ValueError("layer_norm: the GRU with reset_after=False has no layer-normalised form (as in "
                             "Haste)")
        options = {"reset_after": bool(reset_after),
                   **_regularisers(weight_dropout=weight_dropout, zoneout=zoneout)}
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, activation=activation, variational=variational,
                         recurrent_dropout=recurrent_dropout, cell_options=options, algorithm=algorithm,
                         layer_norm=layer_norm)


class RNN(_ConveyorRNNBase):
    """``torch.nn.RNN`` with Conveyor's kernels (``nonlinearity`` "tanh" or "relu"); extra options
    ``variational``, ``recurrent_dropout``, ``algorithm``, ``weight_dropout``."""

    _cell, _gates = "rnn", 1

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 variational=False, recurrent_dropout=0.0, algorithm="auto", weight_dropout=0.0):
        self.nonlinearity = _functional._check_choice("nonlinearity", nonlinearity, _functional._ACTIVATIONS)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, activation=nonlinearity, variational=variational,
                         recurrent_dropout=recurrent_dropout, algorithm=algorithm,
                         cell_options=_regularisers(weight_dropout=weight_dropout))


def _regularisers(**probabilities) -> dict:
    """The regularisers' options that are on (checked probabilities), as the layer's cell options."""
    return {name: p for name, p in ((name, _functional.check_probability(name, value))
                                    for name, value in probabilities.items()) if p > 0}
