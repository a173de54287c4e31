// The device-independent layer of the C++ API: checks every argument against the window's sizes (shape,
// dtype, device, layout) with messages that name it, then hands the call to the backend of the arrays'
// device. Backends may assume what is checked here.
//
// Messages are built with std::string alone, no iostreams: a libstdc++ linked statically into the Python
// module (as some toolchains do) crashed formatting through std::ostringstream's locale machinery.
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "conveyor/conveyor.h"
#include "core/backends.h"
#include "core/nvtx.h"
#include "core/packing.h"

#ifndef CONVEYOR_VERSION
#define CONVEYOR_VERSION "0.0.0"
#endif

namespace conveyor {

// ---------------------------------------------------------------------------------------------------------
// TensorView and names

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < rank; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = rank - 1; d >= 0; --d) {
    // A dimension of size 1 may carry any stride: no two elements are apart along it.
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  if (shape.size() > static_cast<size_t>(kMaxRank)) {
    throw ArgumentError("TensorView::contiguous: at most " + std::to_string(kMaxRank) + " dimensions, got " +
                        std::to_string(shape.size()));
  }
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.rank = static_cast<int>(shape.size());
  int d = 0;
  for (int64_t s : shape) v.shape[d++] = s;
  int64_t stride = 1;
  for (d = v.rank - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::int32: return "int32";
    case DType::int64: return "int64";
  }
  return "unknown";
}

DType cell_state_dtype(DType x_dtype) {
  return x_dtype == DType::float16 || x_dtype == DType::bfloat16 ? DType::float32 : x_dtype;
}

std::string device_name(const Device& device) {
  return device.kind == DeviceKind::cpu ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

namespace {

std::string join(const int64_t* values, int count) {
  std::string out = "(";
  for (int i = 0; i < count; ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + (count == 1 ? ",)" : ")");
}

std::string dims_string(const std::vector<int64_t>& dims) {
  return join(dims.data(), static_cast<int>(dims.size()));
}

}  // namespace

std::string shape_string(const TensorView& view) { return join(view.shape, view.rank); }

const char* cell_name(CellType cell) {
  switch (cell) {
    case CellType::lstm: return "lstm";
    case CellType::gru: return "gru";
    case CellType::rnn: return "rnn";
  }
  return "unknown";
}

const char* activation_name(Activation activation) {
  return activation == Activation::relu ? "relu" : "tanh";
}

const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::automatic: return "auto";
    case Algorithm::per_step: return "per_step";
    case Algorithm::persistent: return "persistent";
  }
  return "unknown";
}

int gate_count(const CellOptions& options) {
  switch (options.cell) {
    case CellType::lstm: return options.coupled_gates ? 3 : 4;
    case CellType::gru: return 3;
    case CellType::rnn: return 1;
  }
  throw ArgumentError("cell: unknown cell type " + std::to_string(static_cast<int>(options.cell)));
}

int cache_width(const CellOptions& options) {
  const int layer_norm = options.layer_norm ? 2 * gate_count(options) : 0;
  switch (options.cell) {
    case CellType::lstm: return (options.zoneout_cell > 0 ? 6 : 5) + layer_norm;
    case CellType::gru: return 4 + layer_norm;
    case CellType::rnn: return 0;
  }
  throw ArgumentError("cell: unknown cell type " + std::to_string(static_cast<int>(options.cell)));
}

const char* version() { return CONVEYOR_VERSION; }

bool cuda_built() { return detail::cuda_backend_built(); }

int cuda_device_count() { return detail::cuda_device_count_or_zero(); }

bool cuda_available() {
  if (!cuda_built() || cuda_device_count() == 0) return false;
  try {
    return detail::cuda_cell_check(0) < 1e-4;
  } catch (const CudaError&) {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks

namespace {

std::string number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", v);
  return text;
}

void check_options(const CellOptions& options) {
  gate_count(options);  // throws on an unknown cell
  if (options.activation != Activation::tanh && options.activation != Activation::relu) {
    throw ArgumentError("activation: expected tanh or relu, got " +
                        std::to_string(static_cast<int>(options.activation)));
  }
  if (options.cell != CellType::lstm) {
    const char* lstm_only = options.peephole ? "peephole" : options.coupled_gates ? "coupled_gates"
                            : options.forget_bias != 0 ? "forget_bias" : options.cell_clip != 0 ? "cell_clip" : nullptr;
    if (lstm_only != nullptr) {
      throw ArgumentError(std::string(lstm_only) + ": an LSTM option, but the cell is " + cell_name(options.cell));
    }
  }
  if (!std::isfinite(options.forget_bias)) {
    throw ArgumentError("forget_bias: expected a finite number, got " + number(options.forget_bias));
  }
  const std::pair<const char*, double> probabilities[] = {{"recurrent_dropout", options.recurrent_dropout},
                                                          {"weight_dropout", options.weight_dropout},
                                                          {"zoneout", options.zoneout},
                                                          {"zoneout_cell", options.zoneout_cell}};
  for (const auto& [name, p] : probabilities) {
    if (!(p >= 0 && p < 1)) {
      throw ArgumentError(std::string(name) + ": expected a probability in [0, 1), got " + number(p));
    }
  }
  if (options.zoneout_cell > 0 && options.cell != CellType::lstm) {
    throw ArgumentError(std::string("zoneout_cell: an LSTM option, but the cell is ") + cell_name(options.cell));
  }
  if (options.zoneout > 0 && options.cell == CellType::rnn) {
    throw ArgumentError("zoneout: an option of the LSTM and the GRU, but the cell is rnn");
  }
  if (options.layer_norm && options.cell == CellType::rnn) {
    throw ArgumentError("layer_norm: an option of the LSTM and the GRU, but the cell is rnn");
  }
  if (options.layer_norm && options.cell == CellType::gru && !options.reset_after) {
    throw ArgumentError("layer_norm: the GRU with reset_after = false has no layer-normalised form (as in Haste)");
  }
  if (!std::isfinite(options.cell_clip) || options.cell_clip < 0) {
    throw ArgumentError("cell_clip: expected a finite number > 0 (or 0 for no clip), got " +
                        number(options.cell_clip));
  }
  if (options.algorithm != Algorithm::automatic && options.algorithm != Algorithm::per_step &&
      options.algorithm != Algorithm::persistent) {
    throw ArgumentError("algorithm: expected auto, per_step or persistent, got " +
                        std::to_string(static_cast<int>(options.algorithm)));
  }
}

// Checks one view against the window: present (unless optional), the expected shape, the dtype (x's, or
// the cell state's for the LSTM's cell-state arrays) and device of x, C-contiguous.
class ViewChecker {
 public:
  explicit ViewChecker(const TensorView& x) : x_(x) {}

  void operator()(const char* name, const TensorView& v, const std::vector<int64_t>& dims,
                  const char* meaning, bool optional = false) const {
    check(name, v, dims, meaning, optional, x_.dtype, "the dtype of x");
  }

  // c0, c_T, dc_T, dc0: of cell_state_dtype(x's dtype), float32 beside 16-bit x.
  void cell_state(const char* name, const TensorView& v, const std::vector<int64_t>& dims, const char* meaning,
                  bool optional) const {
    const DType dtype = cell_state_dtype(x_.dtype);
    check(name, v, dims, meaning, optional, dtype,
          dtype == x_.dtype ? std::string("the dtype of x")
                            : std::string("the cell state's, for ") + dtype_name(x_.dtype) + " x");
  }

 private:
  void check(const char* name, const TensorView& v, const std::vector<int64_t>& dims, const char* meaning,
             bool optional, DType dtype, const std::string& why) const {
    if (!v.present()) {
      if (optional) return;
      throw ArgumentError(std::string(name) + ": expected an array of shape " + dims_string(dims) + " " + meaning +
                          ", got none");
    }
    if (v.data == nullptr) {
      throw ArgumentError(std::string(name) + ": the array of shape " + shape_string(v) + " has no data pointer");
    }
    bool same = v.rank == static_cast<int>(dims.size());
    int d = 0;
    for (int64_t s : dims) same = same && v.shape[d++] == s;
    if (!same) {
      throw ArgumentError(std::string(name) + ": expected shape " + dims_string(dims) + " " + meaning + ", got " +
                          shape_string(v));
    }
    if (v.dtype != dtype) {
      throw DTypeError(std::string(name) + ": expected dtype " + dtype_name(dtype) + " (" + why + "), got " +
                       dtype_name(v.dtype));
    }
    if (v.device.kind != x_.device.kind || v.device.index != x_.device.index) {
      throw ArgumentError(std::string(name) + ": expected an array on " + device_name(x_.device) +
                          " (the device of x), got one on " + device_name(v.device));
    }
    if (!v.is_contiguous()) {
      throw ArgumentError(std::string(name) + ": expected a C-contiguous array, got shape " + shape_string(v) +
                          " with element strides " + join(v.strides, v.rank));
    }
  }

  const TensorView& x_;
};

void check_dtype_supported(const TensorView& x) {
  if (x.dtype == DType::int32 || x.dtype == DType::int64) {
    throw DTypeError(std::string("x: expected a floating-point array, got ") + dtype_name(x.dtype));
  }
  if (x.device.kind == DeviceKind::cpu && x.dtype != DType::float32 && x.dtype != DType::float64) {
    throw DTypeError(std::string("x: the CPU backend computes in float32 or float64, got ") + dtype_name(x.dtype));
  }
}

void check_device_supported(const TensorView& x, const CellOptions& options) {
  if (x.device.kind == DeviceKind::cpu && options.algorithm != Algorithm::automatic) {
    throw ArgumentError(std::string("algorithm: '") + algorithm_name(options.algorithm) +
                        "' is an algorithm of the CUDA backend, but x is on the CPU (expected 'auto')");
  }
  if (x.device.kind == DeviceKind::cuda && !cuda_built()) {
    throw ArgumentError("x: the array is on " + device_name(x.device) +
                        " but this build of Conveyor has no CUDA backend (rebuild where nvcc is found)");
  }
  if (x.device.kind != DeviceKind::cpu && x.device.kind != DeviceKind::cuda) {
    throw ArgumentError("x: unknown device kind " + std::to_string(static_cast<int>(x.device.kind)));
  }
}

void check_no_cell_state_unless_lstm(const CellOptions& options, const char* name, const TensorView& v) {
  if (options.cell != CellType::lstm && v.present()) {
    throw ArgumentError(std::string(name) + ": only an LSTM has a cell state, but the cell is " +
                        cell_name(options.cell));
  }
}

}  // namespace

WindowSizes window_sizes(const CellOptions& options, const TensorView& x, const TensorView& W, const TensorView& R,
                         const TensorView& W_hr) {
  check_options(options);
  const int64_t G = gate_count(options);
  if (!x.present()) throw ArgumentError("x: expected an array of shape (T, B, input_size), got none");
  if (x.rank != 3) {
    throw ArgumentError("x: expected a 3-D array (T, B, input_size), got shape " + shape_string(x));
  }
  static const char* const kXDims[] = {"T (steps)", "B (batch)", "input_size"};
  for (int d = 0; d < 3; ++d) {
    if (x.shape[d] <= 0) {
      throw ArgumentError(std::string("x: ") + kXDims[d] + " must be positive, got shape " + shape_string(x));
    }
  }
  if (W_hr.present()) {
    if (options.cell != CellType::lstm) {
      throw ArgumentError(std::string("W_hr: a projection is an LSTM option, but the cell is ") +
                          cell_name(options.cell));
    }
    if (W_hr.rank != 2 || W_hr.shape[0] <= 0 || W_hr.shape[1] <= 0) {
      throw ArgumentError("W_hr: expected a 2-D array (proj_size, hidden_size), got shape " + shape_string(W_hr));
    }
  }
  // Without a projection R's columns are the hidden units; with one they are the projection's, and H is W_hr's.
  const int64_t H = W_hr.present() ? W_hr.shape[1] : R.present() && R.rank == 2 ? R.shape[1] : 0;
  const int64_t O = W_hr.present() ? W_hr.shape[0] : H;
  const char* R_dims = W_hr.present() ? "*hidden_size, proj_size)" : "*hidden_size, hidden_size)";
  if (!R.present()) throw ArgumentError(std::string("R: expected an array of shape (G") + R_dims + ", got none");
  if (R.rank != 2 || H <= 0 || R.shape[1] != O || R.shape[0] != G * H) {
    throw ArgumentError("R: expected shape " +
                        (H > 0 ? dims_string({G * H, O}) + " = (" : std::string("(")) + std::to_string(G) + R_dims +
                        " for a " + cell_name(options.cell) + " (" + std::to_string(G) + " gate blocks), got " +
                        shape_string(R));
  }
  WindowSizes s;
  s.steps = x.shape[0];
  s.batch = x.shape[1];
  s.input_size = x.shape[2];
  s.hidden_size = H;
  s.output_size = O;
  if (!W.present()) throw ArgumentError("W: expected an array of shape (G*hidden_size, input_size), got none");
  if (W.rank != 2 || W.shape[0] != G * s.hidden_size || W.shape[1] != s.input_size) {
    throw ArgumentError("W: expected shape " + dims_string({G * s.hidden_size, s.input_size}) + " = (" +
                        std::to_string(G) + "*hidden_size, input_size), got " + shape_string(W));
  }
  return s;
}

namespace {

// The window's sizes, once x, W and R are known to agree, and the checker for every other view.
struct Checked {
  WindowSizes sizes;
  int64_t T, B, I, H, GH;
  int64_t O;  // the units of h and y: P with a projection, else H
  bool packed;
  int64_t tokens;  // the rows of the per-step arrays: T * B, or sum(lengths) when packed

  // The shape of a per-step array of `width` columns, and what it means.
  std::vector<int64_t> per_step(int64_t width) const {
    return packed ? std::vector<int64_t>{tokens, width} : std::vector<int64_t>{T, B, width};
  }
  std::string meaning(const char* width) const {
    return packed ? std::string("[tokens, ") + width + "] (packed)" : std::string("[T, B, ") + width + "]";
  }
  // The units of h: "hidden_size", or "proj_size" with a projection.
  const char* state_units() const { return O != H ? "proj_size" : "hidden_size"; }
  std::string state_meaning(const char* prefix) const { return std::string(prefix) + state_units() + "]"; }
};

// Packed arrays (ForwardArgs::packed): the lengths, read on the host, must be non-increasing and add up to
// x's rows; T is the first.
WindowSizes packed_window_sizes(const CellOptions& options, const TensorView& x, const TensorView& W,
                                const TensorView& R, const TensorView& W_hr, const TensorView& lengths) {
  if (!lengths.present()) throw ArgumentError("lengths: packed arrays need the lengths of their rows, got none");
  if (!x.present() || x.rank != 2) {
    throw ArgumentError("x: expected a packed 2-D array (tokens, input_size), got " +
                        (x.present() ? "shape " + shape_string(x) : std::string("none")));
  }
  if (lengths.device.kind != DeviceKind::cpu) {
    throw ArgumentError("lengths: packed arrays need lengths on the CPU, got them on " + device_name(lengths.device));
  }
  if (lengths.rank != 1 || lengths.shape[0] < 1) {
    throw ArgumentError("lengths: expected a 1-D array (B,), got shape " + shape_string(lengths));
  }
  if (lengths.dtype != DType::int32 && lengths.dtype != DType::int64) {
    throw DTypeError(std::string("lengths: expected dtype int32 or int64, got ") + dtype_name(lengths.dtype));
  }
  TensorView as_window = x;  // [tokens, 1, input_size], for the checks of x, W and R that window_sizes makes
  as_window.rank = 3;
  as_window.shape[2] = x.shape[1];
  as_window.shape[1] = 1;
  WindowSizes s = window_sizes(options, as_window, W, R, W_hr);
  const std::vector<int64_t> values = detail::host_lengths(lengths);
  int64_t tokens = 0;
  for (size_t b = 0; b < values.size(); ++b) {
    if (values[b] < 1 || (b > 0 && values[b] > values[b - 1])) {
      throw ArgumentError("lengths: packed arrays need lengths >= 1 in non-increasing order (the rows sorted "
                          "longest first), got lengths[" + std::to_string(b) + "] = " + std::to_string(values[b]) +
                          (b > 0 ? " after " + std::to_string(values[b - 1]) : std::string()));
    }
    tokens += values[b];
  }
  if (tokens != x.shape[0]) {
    throw ArgumentError("x: expected sum(lengths) = " + std::to_string(tokens) + " rows (packed), got shape " +
                        shape_string(x));
  }
  s.steps = values[0];
  s.batch = static_cast<int64_t>(values.size());
  return s;
}

Checked check_window(const CellOptions& options, const TensorView& x, const TensorView& W, const TensorView& R,
                     const TensorView& W_hr, const TensorView& lengths, bool packed) {
  const WindowSizes s =
      packed ? packed_window_sizes(options, x, W, R, W_hr, lengths) : window_sizes(options, x, W, R, W_hr);
  check_device_supported(x, options);
  check_dtype_supported(x);
  return {s,      s.steps, s.batch, s.input_size, s.hidden_size, gate_count(options) * s.hidden_size, s.output_size,
          packed, packed ? x.shape[0] : s.steps * s.batch};
}

// The layer-norm gains: required with layer_norm ([G*H] each, and the LSTM's [H] each), refused without it.
void check_layer_norm(const CellOptions& options, const ViewChecker& check, const Checked& c,
                      const TensorView& gamma_x, const TensorView& gamma_h, const TensorView& gamma_c,
                      const TensorView& beta_c) {
  const bool lstm = options.cell == CellType::lstm;
  const std::pair<const char*, const TensorView*> gains[] = {
      {"gamma_x", &gamma_x}, {"gamma_h", &gamma_h}, {"gamma_c", &gamma_c}, {"beta_c", &beta_c}};
  for (int k = 0; k < 4; ++k) {
    const auto& [name, view] = gains[k];
    if (!options.layer_norm || (k >= 2 && !lstm)) {
      if (view->present()) {
        throw ArgumentError(std::string(name) + ": a layer-norm gain given, but " +
                            (options.layer_norm ? "only the LSTM normalises its cell" : "layer_norm is off"));
      }
      continue;
    }
    if (k < 2) {
      check(name, *view, {c.GH}, "[G*hidden_size] with layer_norm");
    } else {
      check(name, *view, {c.H}, "[hidden_size] with layer_norm");
    }
  }
}

// P is required with peephole and refused without it.
void check_peephole(const CellOptions& options, const ViewChecker& check, const Checked& c, const TensorView& P) {
  if (options.peephole) {
    check("P", P, {3, c.H}, "[3, hidden_size] (p_i, p_f, p_o) with peephole");
  } else if (P.present()) {
    throw ArgumentError("P: peephole weights given, but the cell has no peephole (set peephole)");
  }
}

// x, W, R, W_hr and the initial states, which forward and backward both read.
Checked check_window_inputs(const CellOptions& options, const TensorView& x, const TensorView& W, const TensorView& R,
                            const TensorView& W_hr, const TensorView& h0, const TensorView& c0,
                            const TensorView& lengths, bool packed) {
  const Checked c = check_window(options, x, W, R, W_hr, lengths, packed);
  const ViewChecker check(x);
  check("x", x, c.per_step(c.I), c.meaning("input_size").c_str());
  check("W", W, {c.GH, c.I}, "[G*hidden_size, input_size]");
  check("R", R, {c.GH, c.O}, c.state_meaning("[G*hidden_size, ").c_str());
  check("W_hr", W_hr, {c.O, c.H}, "[proj_size, hidden_size]", true);
  check("h0", h0, {c.B, c.O}, c.state_meaning("[B, ").c_str(), true);
  check_no_cell_state_unless_lstm(options, "c0", c0);
  check.cell_state("c0", c0, {c.B, c.H}, "[B, hidden_size]", true);
  return c;
}

// lengths: absent, or [B] of int32 or int64, C-contiguous, on the CPU or x's device. Its values are checked
// where the backend reads them (pack_batch).
void check_lengths(const Checked& c, const TensorView& x, const TensorView& lengths) {
  if (!lengths.present()) return;
  if (lengths.data == nullptr) {
    throw ArgumentError("lengths: the array of shape " + shape_string(lengths) + " has no data pointer");
  }
  if (lengths.rank != 1 || lengths.shape[0] != c.B) {
    throw ArgumentError("lengths: expected shape " + dims_string({c.B}) + " [B], got " + shape_string(lengths));
  }
  if (lengths.dtype != DType::int32 && lengths.dtype != DType::int64) {
    throw DTypeError(std::string("lengths: expected dtype int32 or int64, got ") + dtype_name(lengths.dtype));
  }
  const bool on_host = lengths.device.kind == DeviceKind::cpu;
  const bool on_x_device = lengths.device.kind == x.device.kind && lengths.device.index == x.device.index;
  if (!on_host && !on_x_device) {
    throw ArgumentError("lengths: expected an array on the CPU or on " + device_name(x.device) +
                        " (the device of x), got one on " + device_name(lengths.device));
  }
  if (!lengths.is_contiguous()) {
    throw ArgumentError("lengths: expected a contiguous array, got element stride " +
                        std::to_string(lengths.strides[0]));
  }
}

Checked check_forward_inputs_impl(const CellOptions& options, const ForwardArgs& args) {
  const Checked c = check_window_inputs(options, args.x, args.W, args.R, args.W_hr, args.h0, args.c0, args.lengths,
                                        args.packed);
  check_lengths(c, args.x, args.lengths);
  const ViewChecker check(args.x);
  check("bW", args.bW, {c.GH}, "[G*hidden_size]", true);
  check("bR", args.bR, {c.GH}, "[G*hidden_size]", true);
  check_peephole(options, check, c, args.P);
  check_layer_norm(options, check, c, args.gamma_x, args.gamma_h, args.gamma_c, args.beta_c);
  return c;
}

Checked check_backward_inputs_impl(const CellOptions& options, const BackwardArgs& args) {
  const Checked c = check_window_inputs(options, args.x, args.W, args.R, args.W_hr, args.h0, args.c0, args.lengths,
                                        args.packed);
  check_lengths(c, args.x, args.lengths);
  const ViewChecker check(args.x);
  check("y", args.y, c.per_step(c.O), c.meaning(c.state_units()).c_str());
  if (cache_width(options) > 0) {
    check("cache", args.cache, c.per_step(cache_width(options) * c.H),
          (c.meaning("cache_width*hidden_size") + " from forward").c_str());
  }
  check("dy", args.dy, c.per_step(c.O), c.meaning(c.state_units()).c_str());
  check("dh_T", args.dh_T, {c.B, c.O}, c.state_meaning("[B, ").c_str(), true);
  check_no_cell_state_unless_lstm(options, "dc_T", args.dc_T);
  check.cell_state("dc_T", args.dc_T, {c.B, c.H}, "[B, hidden_size]", true);
  check_peephole(options, check, c, args.P);
  check_layer_norm(options, check, c, args.gamma_x, args.gamma_h, args.gamma_c, args.beta_c);
  return c;
}

int64_t itemsize(DType dtype) {
  switch (dtype) {
    case DType::float64:
    case DType::int64: return 8;
    case DType::float32:
    case DType::int32: return 4;
    case DType::float16:
    case DType::bfloat16: return 2;
  }
  return 8;
}

struct Named {
  const char* name;
  const TensorView* view;
};

bool overlap(const TensorView& a, const TensorView& b) {
  if (!a.present() || !b.present() || a.numel() == 0 || b.numel() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  return a0 < b0 + b.numel() * itemsize(b.dtype) && b0 < a0 + a.numel() * itemsize(a.dtype);
}

// The header's promise: outputs share memory with no input and no other output.
void check_no_aliasing(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const Named& i : inputs) {
      if (overlap(*o->view, *i.view)) {
        throw ArgumentError(std::string(o->name) + ": shares memory with the input " + i.name +
                            "; outputs must not alias inputs");
      }
    }
    for (auto other = outputs.begin(); other != o; ++other) {
      if (overlap(*o->view, *other->view)) {
        throw ArgumentError(std::string(o->name) + ": shares memory with the output " + other->name +
                            "; outputs must not alias each other");
      }
    }
  }
}

}  // namespace

void check_forward_inputs(const CellOptions& options, const ForwardArgs& args) {
  check_forward_inputs_impl(options, args);
}

BackwardArgs backward_args_for(const ForwardArgs& f) {
  BackwardArgs b;
  b.x = f.x;
  b.W = f.W;
  b.R = f.R;
  b.h0 = f.h0;
  b.c0 = f.c0;
  b.P = f.P;
  b.W_hr = f.W_hr;
  b.gamma_x = f.gamma_x;
  b.gamma_h = f.gamma_h;
  b.gamma_c = f.gamma_c;
  b.beta_c = f.beta_c;
  b.y = f.y;
  b.cache = f.cache;
  b.lengths = f.lengths;
  b.packed = f.packed;
  return b;
}

void check_backward_inputs(const CellOptions& options, const BackwardArgs& args) {
  check_backward_inputs_impl(options, args);
}

void forward(const CellOptions& options, const ForwardArgs& args, void* stream) {
  const Checked c = check_forward_inputs_impl(options, args);
  const ViewChecker check(args.x);
  check("y", args.y, c.per_step(c.O), c.meaning(c.state_units()).c_str());
  check("h_T", args.h_T, {c.B, c.O}, c.state_meaning("[B, ").c_str(), true);
  check_no_cell_state_unless_lstm(options, "c_T", args.c_T);
  check.cell_state("c_T", args.c_T, {c.B, c.H}, "[B, hidden_size]", true);
  if (cache_width(options) > 0) {
    check("cache", args.cache, c.per_step(cache_width(options) * c.H), c.meaning("cache_width*hidden_size").c_str(),
          true);
  }
  check_no_aliasing({{"y", &args.y}, {"h_T", &args.h_T}, {"c_T", &args.c_T}, {"cache", &args.cache}},
                    {{"x", &args.x}, {"W", &args.W}, {"R", &args.R}, {"bW", &args.bW}, {"bR", &args.bR},
                     {"h0", &args.h0}, {"c0", &args.c0}, {"P", &args.P}, {"W_hr", &args.W_hr},
                     {"gamma_x", &args.gamma_x}, {"gamma_h", &args.gamma_h}, {"gamma_c", &args.gamma_c},
                     {"beta_c", &args.beta_c}, {"lengths", &args.lengths}});
  const std::string operation = std::string("conveyor::") + cell_name(options.cell) + "_forward";
  const detail::NvtxRange range(operation.c_str());
  if (args.x.device.kind == DeviceKind::cuda) {
    detail::cuda_forward(options, c.sizes, args, stream);
  } else {
    detail::cpu_forward(options, c.sizes, args);
  }
}

void dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out,
                  void* stream) {
  if (!(p >= 0 && p < 1)) throw ArgumentError("p: expected a probability in [0, 1), got " + number(p));
  if (!out.present() || out.rank != 3) {
    throw ArgumentError("out: expected an array of shape (T, B, H), got " +
                        (out.present() ? shape_string(out) : std::string("none")));
  }
  const ViewChecker check(out);
  check("out", out, {out.shape[0], out.shape[1], out.shape[2]}, "(T, B, H)");
  if (out.dtype == DType::int32 || out.dtype == DType::int64) {
    throw DTypeError(std::string("out: expected a floating-point array, got ") + dtype_name(out.dtype));
  }
  check_device_supported(out, CellOptions{});
  const detail::NvtxRange range("conveyor::dropout_mask");
  if (out.device.kind == DeviceKind::cuda) {
    detail::cuda_dropout_mask(p, variational, seed, mask_stream, out, stream);
  } else {
    check_dtype_supported(out);
    detail::cpu_dropout_mask(p, variational, seed, mask_stream, out);
  }
}

void backward(const CellOptions& options, const BackwardArgs& args, void* stream) {
  const Checked c = check_backward_inputs_impl(options, args);
  const ViewChecker check(args.x);
  check("dx", args.dx, c.per_step(c.I), c.meaning("input_size").c_str(), true);
  check("dh0", args.dh0, {c.B, c.O}, c.state_meaning("[B, ").c_str(), true);
  check_no_cell_state_unless_lstm(options, "dc0", args.dc0);
  check.cell_state("dc0", args.dc0, {c.B, c.H}, "[B, hidden_size]", true);
  check("dW", args.dW, {c.GH, c.I}, "[G*hidden_size, input_size]", true);
  check("dR", args.dR, {c.GH, c.O}, c.state_meaning("[G*hidden_size, ").c_str(), true);
  check("dbW", args.dbW, {c.GH}, "[G*hidden_size]", true);
  check("dbR", args.dbR, {c.GH}, "[G*hidden_size]", true);
  if (args.dP.present() && !options.peephole) {
    throw ArgumentError("dP: a peephole gradient was asked for, but the cell has no peephole");
  }
  check("dP", args.dP, {3, c.H}, "[3, hidden_size]", true);
  if (args.dW_hr.present() && !args.W_hr.present()) {
    throw ArgumentError("dW_hr: a projection gradient was asked for, but the window has no projection (W_hr)");
  }
  check("dW_hr", args.dW_hr, {c.O, c.H}, "[proj_size, hidden_size]", true);
  const std::pair<const char*, const TensorView*> gain_grads[] = {
      {"dgamma_x", &args.dgamma_x}, {"dgamma_h", &args.dgamma_h}, {"dgamma_c", &args.dgamma_c},
      {"dbeta_c", &args.dbeta_c}};
  for (int k = 0; k < 4; ++k) {
    const auto& [name, view] = gain_grads[k];
    if (view->present() && (!options.layer_norm || (k >= 2 && options.cell != CellType::lstm))) {
      throw ArgumentError(std::string(name) + ": a layer-norm gradient was asked for, but the window has no such "
                          "gain");
    }
    check(name, *view, {k < 2 ? c.GH : c.H}, k < 2 ? "[G*hidden_size]" : "[hidden_size]", true);
  }
  check_no_aliasing({{"dx", &args.dx}, {"dh0", &args.dh0}, {"dc0", &args.dc0}, {"dW", &args.dW}, {"dR", &args.dR},
                     {"dbW", &args.dbW}, {"dbR", &args.dbR}, {"dP", &args.dP}, {"dW_hr", &args.dW_hr},
                     {"dgamma_x", &args.dgamma_x}, {"dgamma_h", &args.dgamma_h}, {"dgamma_c", &args.dgamma_c},
                     {"dbeta_c", &args.dbeta_c}},
                    {{"x", &args.x}, {"W", &args.W}, {"R", &args.R}, {"h0", &args.h0}, {"c0", &args.c0},
                     {"P", &args.P}, {"W_hr", &args.W_hr}, {"gamma_x", &args.gamma_x}, {"gamma_h", &args.gamma_h},
                     {"gamma_c", &args.gamma_c}, {"beta_c", &args.beta_c}, {"y", &args.y}, {"cache", &args.cache},
                     {"dy", &args.dy}, {"dh_T", &args.dh_T}, {"dc_T", &args.dc_T}, {"lengths", &args.lengths}});
  const std::string operation = std::string("conveyor::") + cell_name(options.cell) + "_backward";
  const detail::NvtxRange range(operation.c_str());
  if (args.x.device.kind == DeviceKind::cuda) {
    detail::cuda_backward(options, c.sizes, args, stream);
  } else {
    detail::cpu_backward(options, c.sizes, args);
  }
}

}  // namespace conveyor
