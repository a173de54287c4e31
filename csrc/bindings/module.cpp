// The pybind11 module conveyor._conveyor. It does four things and no math: turns arrays into TensorViews
// (rejecting what is not an array, with the argument's name), allocates the outputs, releases the GIL, and
// calls the C++ API, whose ArgumentError/DTypeError/CudaError become ValueError/TypeError/RuntimeError with
// the message intact.
//
// Two entry points per direction: forward/backward take NumPy arrays and allocate NumPy outputs;
// forward_dlpack/backward_dlpack take arrays of any library that exports DLPack (CuPy, PyTorch, JAX, on the
// CPU or a CUDA device), without copies, and get their outputs from a Python callable that allocates them in
// the caller's library. Outputs have x's dtype but for the LSTM's c_T and dc0, which have cell_state_dtype(x)
// (float32 beside 16-bit x; conveyor.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "conveyor/conveyor.h"
#include "core/backends.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;
using namespace conveyor;

namespace {

bool poison_outputs = false;  // tests fill every output with NaN first, so an unwritten element shows

std::string type_name(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }

// Checks that `obj` is a NumPy array of a floating-point dtype and views it. Shapes and dtypes relative to
// the other arguments are checked by the C++ API, which knows the window.
TensorView view_of(const char* name, const py::object& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " + type_name(obj));
  }
  const auto array = py::reinterpret_borrow<py::array>(obj);
  TensorView v;
  const py::dtype dtype = array.dtype();
  const char kind = dtype.kind();
  const auto itemsize = array.itemsize();
  if (kind == 'f' && itemsize == 4) {
    v.dtype = DType::float32;
  } else if (kind == 'f' && itemsize == 8) {
    v.dtype = DType::float64;
  } else if (kind == 'f' && itemsize == 2) {
    v.dtype = DType::float16;
  } else {
    throw py::type_error(std::string(name) + ": expected a float32 or float64 array, got dtype " +
                         std::string(py::str(dtype)));
  }
  // NumPy's isnative from the descriptor's byte order: '=' native, '|' not applicable, '<' or '>' spelled out
  // (a Python attribute lookup for each of a call's arrays cost more than the rest of the view).
  const char order = dtype.byteorder();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  constexpr char native = '>';
#else
  constexpr char native = '<';
#endif
  if (order != '=' && order != '|' && order != native) {
    throw py::type_error(std::string(name) + ": expected native byte order, got dtype " +
                         std::string(py::str(dtype.attr("str"))) + " (convert with .astype(np.float32))");
  }
  if (array.ndim() > kMaxRank) {
    throw py::value_error(std::string(name) + ": expected at most " + std::to_string(kMaxRank) +
                          " dimensions, got " + std::to_string(array.ndim()));
  }
  v.data = const_cast<void*>(array.data());
  v.rank = static_cast<int>(array.ndim());
  for (int d = 0; d < v.rank; ++d) {
    v.shape[d] = array.shape(d);
    // A byte stride that is not a whole number of elements can never be contiguous; -1 marks it so.
    v.strides[d] = array.strides(d) % itemsize == 0 ? array.strides(d) / itemsize : -1;
  }
  if (v.data == nullptr) v.data = &poison_outputs;  // an empty array still counts as present
  return v;
}

TensorView optional_view_of(const char* name, const py::object& obj) {
  return obj.is_none() ? TensorView{} : view_of(name, obj);
}

// `lengths` as a NumPy array: None, or int32 or int64 (the Python layer makes sequences and other integer
// NumPy arrays int64).
TensorView lengths_view_of(const py::object& obj) {
  if (obj.is_none()) return TensorView{};
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error("lengths: expected a numpy.ndarray, got " + type_name(obj));
  }
  const auto array = py::reinterpret_borrow<py::array>(obj);
  TensorView v;
  const char kind = array.dtype().kind();
  if ((kind == 'i') && array.itemsize() == 8 && array.dtype().attr("isnative").cast<bool>()) {
    v.dtype = DType::int64;
  } else if ((kind == 'i') && array.itemsize() == 4 && array.dtype().attr("isnative").cast<bool>()) {
    v.dtype = DType::int32;
  } else {
    throw py::type_error("lengths: expected an int32 or int64 array, got dtype " + std::string(py::str(array.dtype())));
  }
  if (array.ndim() > kMaxRank) {
    throw py::value_error("lengths: expected shape (B,), got " + std::to_string(array.ndim()) + " dimensions");
  }
  v.data = const_cast<void*>(array.data());
  v.rank = static_cast<int>(array.ndim());
  for (int d = 0; d < v.rank; ++d) {
    v.shape[d] = array.shape(d);
    v.strides[d] = array.strides(d) % array.itemsize() == 0 ? array.strides(d) / array.itemsize() : -1;
  }
  if (v.data == nullptr) v.data = &poison_outputs;
  return v;
}

py::array new_output(const py::dtype& dtype, std::vector<py::ssize_t> shape) {
  py::array out(dtype, shape);
  if (poison_outputs) {
    out.attr("fill")(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

TensorView output_view(py::array& out) { return view_of("output", out); }

// ---------------------------------------------------------------------------------------------------------
// DLPack (dmlc.github.io/dlpack): the structs of its stable C ABI, version 0.x, as a producer's __dlpack__
// hands them over in a PyCapsule named "dltensor".

struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4;

// The views of one call's arrays on the DLPack path. It holds their capsules, unconsumed, so that every
// producer keeps its memory alive until the call returns; dropping a capsule gives the tensor back.
class DLPackViews {
 public:
  // `stream`: the cudaStream_t the call runs on (0: the legacy default stream). CUDA producers are asked to
  // make their data ready on it.
  explicit DLPackViews(int64_t stream) : stream_(stream) {}

  TensorView operator()(const char* name, const py::object& obj) {
    if (py::isinstance<py::array>(obj)) return view_of(name, obj);
    if (!py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "__dlpack_device__")) {
      throw py::type_error(std::string(name) +
                           ": expected an array (NumPy, or one with __dlpack__ such as CuPy, PyTorch or JAX), got " +
                           type_name(obj));
    }
    const auto device = obj.attr("__dlpack_device__")().cast<std::pair<int, int>>();
    const bool cuda = device.first == kDLCUDA || device.first == kDLCUDAManaged;
    // DLPack names the legacy default stream 1, since 0 would be ambiguous.
    py::object capsule = cuda ? obj.attr("__dlpack__")(py::arg("stream") = stream_ == 0 ? 1 : stream_)
                              : obj.attr("__dlpack__")();
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) {
      PyErr_Clear();
      throw py::type_error(std::string(name) + ": " + type_name(obj) +
                           ".__dlpack__() did not return a DLPack capsule named 'dltensor'");
    }
    capsules_.push_back(capsule);
    return view_of_tensor(name, managed->dl_tensor, std::string(name) == "lengths");
  }

  TensorView optional(const char* name, const py::object& obj) {
    return obj.is_none() ? TensorView{} : (*this)(name, obj);
  }

  // `lengths` may live on any device the call accepts (the core copies it to the host).
  TensorView lengths(const py::object& obj) {
    return obj.is_none() || py::isinstance<py::array>(obj) ? lengths_view_of(obj) : (*this)("lengths", obj);
  }

 private:
  // `integers`: int32 and int64 are taken too (lengths alone).
  static TensorView view_of_tensor(const char* name, const DLTensor& t, bool integers) {
    TensorView v;
    const int code = t.dtype.code, bits = t.dtype.bits;
    if (t.dtype.lanes == 1 && code == kDLFloat && bits == 32) {
      v.dtype = DType::float32;
    } else if (t.dtype.lanes == 1 && code == kDLFloat && bits == 64) {
      v.dtype = DType::float64;
    } else if (t.dtype.lanes == 1 && code == kDLFloat && bits == 16) {
      v.dtype = DType::float16;
    } else if (t.dtype.lanes == 1 && code == kDLBfloat && bits == 16) {
      v.dtype = DType::bfloat16;
    } else if (integers && t.dtype.lanes == 1 && code == kDLInt && (bits == 32 || bits == 64)) {
      v.dtype = bits == 32 ? DType::int32 : DType::int64;
    } else if (integers) {
      throw py::type_error(std::string(name) + ": expected an int32 or int64 array, got DLPack type code " +
                           std::to_string(code) + " with " + std::to_string(bits) + " bits and " +
                           std::to_string(t.dtype.lanes) + " lanes");
    } else {
      throw py::type_error(std::string(name) +
                           ": expected a float32, float64, float16 or bfloat16 array, got DLPack type code " +
                           std::to_string(code) + " with " + std::to_string(bits) + " bits and " +
                           std::to_string(t.dtype.lanes) + " lanes");
    }
    if (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost) {
      v.device = Device{DeviceKind::cpu, 0};
    } else if (t.device.device_type == kDLCUDA || t.device.device_type == kDLCUDAManaged) {
      v.device = Device{DeviceKind::cuda, t.device.device_id};
    } else {
      throw py::value_error(std::string(name) + ": expected an array on the CPU or a CUDA device, got one on DLPack "
                            "device type " + std::to_string(t.device.device_type));
    }
    if (t.ndim < 0 || t.ndim > kMaxRank) {
      throw py::value_error(std::string(name) + ": expected at most " + std::to_string(kMaxRank) +
                            " dimensions, got " + std::to_string(t.ndim));
    }
    v.rank = t.ndim;
    int64_t stride = 1;
    for (int d = v.rank - 1; d >= 0; --d) {
      v.shape[d] = t.shape[d];
      v.strides[d] = t.strides != nullptr ? t.strides[d] : stride;
      stride *= t.shape[d];
    }
    v.data = static_cast<char*>(t.data) + t.byte_offset;
    if (v.data == nullptr) v.data = &poison_outputs;  // an empty array still counts as present
    return v;
  }

  int64_t stream_;
  std::vector<py::object> capsules_;
};

std::string repr_of(const py::handle& obj) { return py::str(py::repr(obj)); }

// The cell options from the Python layer's dict (every key optional, defaults as in CellOptions). The
// Python layer has checked the types; unknown keys are a bug there, not the user's, but still an error.
CellOptions cell_options(const std::string& cell, const py::dict& given) {
  CellOptions o;
  if (cell == "lstm") {
    o.cell = CellType::lstm;
  } else if (cell == "gru") {
    o.cell = CellType::gru;
  } else if (cell == "rnn") {
    o.cell = CellType::rnn;
  } else {
    throw py::value_error("cell: expected 'lstm', 'gru' or 'rnn', got '" + cell + "'");
  }
  for (const auto& item : given) {
    const std::string key = py::str(item.first);
    const py::handle value = item.second;
    if (key == "activation") {
      const std::string activation = py::str(value);
      if (activation == "tanh") {
        o.activation = Activation::tanh;
      } else if (activation == "relu") {
        o.activation = Activation::relu;
      } else {
        throw py::value_error("activation: expected 'tanh' or 'relu', got " + repr_of(value));
      }
    } else if (key == "reset_after") {
      o.reset_after = value.cast<bool>();
    } else if (key == "allow_tf32") {
      o.allow_tf32 = value.cast<bool>();
    } else if (key == "algorithm") {
      const std::string algorithm = py::str(value);
      if (algorithm == "auto") {
        o.algorithm = Algorithm::automatic;
      } else if (algorithm == "per_step") {
        o.algorithm = Algorithm::per_step;
      } else if (algorithm == "persistent") {
        o.algorithm = Algorithm::persistent;
      } else {
        throw py::value_error("algorithm: expected 'auto', 'per_step' or 'persistent', got " + repr_of(value));
      }
    } else if (key == "peephole") {
      o.peephole = value.cast<bool>();
    } else if (key == "coupled_gates") {
      o.coupled_gates = value.cast<bool>();
    } else if (key == "forget_bias") {
      o.forget_bias = value.cast<double>();
    } else if (key == "cell_clip") {
      o.cell_clip = value.cast<double>();
    } else if (key == "recurrent_dropout") {
      o.recurrent_dropout = value.cast<double>();
    } else if (key == "variational") {
      o.variational = value.cast<bool>();
    } else if (key == "dropout_seed") {
      o.dropout_seed = value.cast<uint64_t>();
    } else if (key == "dropout_stream") {
      o.dropout_stream = value.cast<uint64_t>();
    } else if (key == "weight_dropout") {
      o.weight_dropout = value.cast<double>();
    } else if (key == "weight_dropout_stream") {
      o.weight_dropout_stream = value.cast<uint64_t>();
    } else if (key == "zoneout") {
      o.zoneout = value.cast<double>();
    } else if (key == "zoneout_cell") {
      o.zoneout_cell = value.cast<double>();
    } else if (key == "zoneout_sample") {
      o.zoneout_sample = value.cast<bool>();
    } else if (key == "zoneout_stream") {
      o.zoneout_stream = value.cast<uint64_t>();
    } else if (key == "zoneout_cell_stream") {
      o.zoneout_cell_stream = value.cast<uint64_t>();
    } else if (key == "layer_norm") {
      o.layer_norm = value.cast<bool>();
    } else {
      throw py::value_error("options: unknown cell option '" + key + "'");
    }
  }
  return o;
}

// Where views of the arguments come from: NumPy arrays only, or any array through DLPack (DLPackViews).
struct NumpyViews {
  TensorView operator()(const char* name, const py::object& obj) const { return view_of(name, obj); }
  TensorView optional(const char* name, const py::object& obj) const { return optional_view_of(name, obj); }
  TensorView lengths(const py::object& obj) const { return lengths_view_of(obj); }
};

using Output = std::pair<py::object, TensorView>;

// New NumPy outputs of the given dtype (float32 or float64: the CPU backend's, checked before any output is
// made).
struct NumpyOutputs {
  Output operator()(const std::vector<py::ssize_t>& shape, DType dtype) const {
    // py::dtype::of, not the dtype's name: NumPy parses a name anew on every call.
    py::array out = new_output(dtype == DType::float64 ? py::dtype::of<double>() : py::dtype::of<float>(), shape);
    return {out, output_view(out)};
  }
};

// Outputs from the caller's allocator, allocate(shape, dtype_name) -> a new array of x's library and device
// and of the dtype named ("float32", "float64", "float16" or "bfloat16").
struct DLPackOutputs {
  const py::function& allocate;
  DLPackViews& views;
  Output operator()(const std::vector<py::ssize_t>& shape, DType dtype) const {
    py::object out = allocate(py::tuple(py::cast(shape)), dtype_name(dtype));
    return {out, views("output", out)};
  }
};

// The shapes of a window's outputs, read off checked arguments: per-step arrays [T, B, width], or
// [tokens, width] when packed (ForwardArgs::packed).
struct Layout {
  int64_t rows0, rows1;  // T and B, or tokens and 0 (packed)
  int64_t batch, input_size, hidden_size;
  int64_t output_size;  // the units of h and y: proj_size with a projection, else hidden_size
  std::vector<py::ssize_t> per_step(int64_t width) const {
    return rows1 > 0 ? std::vector<py::ssize_t>{rows0, rows1, width} : std::vector<py::ssize_t>{rows0, width};
  }
};

Layout layout_of(const TensorView& x, const TensorView& R, const TensorView& W_hr, const TensorView& lengths,
                 bool packed) {
  const int64_t hidden = W_hr.present() ? W_hr.shape[1] : R.shape[1];
  if (packed) return {x.shape[0], 0, lengths.shape[0], x.shape[1], hidden, R.shape[1]};
  return {x.shape[0], x.shape[1], x.shape[1], x.shape[2], hidden, R.shape[1]};
}

// The layer-norm gains (gamma_x, gamma_h[, gamma_c, beta_c]) of a Python tuple, or None, into the args.
template <typename Views, typename Args>
void layer_norm_views(Views& views, const py::object& layer_norm, Args& args) {
  if (layer_norm.is_none()) return;
  const py::tuple gains = layer_norm.cast<py::tuple>();
  if (gains.size() != 2 && gains.size() != 4) {
    throw py::value_error("layer_norm: expected (gamma_x, gamma_h) or (gamma_x, gamma_h, gamma_c, beta_c), got " +
                          std::to_string(gains.size()) + " arrays");
  }
  args.gamma_x = views("gamma_x", gains[0]);
  args.gamma_h = views("gamma_h", gains[1]);
  if (gains.size() == 4) {
    args.gamma_c = views("gamma_c", gains[2]);
    args.beta_c = views("beta_c", gains[3]);
  }
}

// (y, h_T, c_T or None, cache or None)
template <typename Views, typename Outputs>
py::tuple run_forward(const CellOptions& options, Views& views, const Outputs& outputs, const py::object& x,
                      const py::object& W, const py::object& R, const py::object& bW, const py::object& bR,
                      const py::object& h0, const py::object& c0, const py::object& P, const py::object& W_hr,
                      const py::object& layer_norm,
                      const py::object& lengths, bool packed, bool training, int64_t stream) {
  ForwardArgs args;
  args.x = views("x", x);
  args.W = views("W", W);
  args.R = views("R", R);
  args.bW = views.optional("bW", bW);
  args.bR = views.optional("bR", bR);
  args.h0 = views.optional("h0", h0);
  args.c0 = views.optional("c0", c0);
  args.P = views.optional("P", P);
  args.W_hr = views.optional("W_hr", W_hr);
  layer_norm_views(views, layer_norm, args);
  args.lengths = views.lengths(lengths);
  args.packed = packed;
  check_forward_inputs(options, args);
  const Layout s = layout_of(args.x, args.R, args.W_hr, args.lengths, packed);
  const DType dtype = args.x.dtype, cell_dtype = cell_state_dtype(args.x.dtype);
  Output y = outputs(s.per_step(s.output_size), dtype);
  Output h_T = outputs({s.batch, s.output_size}, dtype);
  Output c_T{py::none(), TensorView{}};
  Output cache{py::none(), TensorView{}};
  if (options.cell == CellType::lstm) c_T = outputs({s.batch, s.hidden_size}, cell_dtype);
  if (training && cache_width(options) > 0) {
    cache = outputs(s.per_step(cache_width(options) * s.hidden_size), dtype);
  }
  args.y = y.second;
  args.h_T = h_T.second;
  args.c_T = c_T.second;
  args.cache = cache.second;
  {
    py::gil_scoped_release release;
    conveyor::forward(options, args, reinterpret_cast<void*>(stream));
  }
  return py::make_tuple(y.first, h_T.first, c_T.first, cache.first);
}

// (dx, dh0, dc0 or None, dW, dR, dbW or None, dbR or None, dP or None, dW_hr or None, the layer-norm gains'
// gradients as a tuple or None)
template <typename Views, typename Outputs>
py::tuple run_backward(const CellOptions& options, Views& views, const Outputs& outputs, const py::object& x,
                       const py::object& W, const py::object& R, const py::object& h0, const py::object& c0,
                       const py::object& P, const py::object& W_hr, const py::object& layer_norm, const py::object& y,
                       const py::object& cache,
                       const py::object& dy, const py::object& dh_T, const py::object& dc_T,
                       const py::object& lengths, bool packed, bool has_bW, bool has_bR, int64_t stream) {
  BackwardArgs args;
  args.x = views("x", x);
  args.W = views("W", W);
  args.R = views("R", R);
  args.h0 = views.optional("h0", h0);
  args.c0 = views.optional("c0", c0);
  args.P = views.optional("P", P);
  args.W_hr = views.optional("W_hr", W_hr);
  layer_norm_views(views, layer_norm, args);
  args.y = views("y", y);
  if (cache_width(options) > 0) args.cache = views("cache", cache);
  args.dy = views("dy", dy);
  args.dh_T = views.optional("dh_T", dh_T);
  args.dc_T = views.optional("dc_T", dc_T);
  args.lengths = views.lengths(lengths);
  args.packed = packed;
  check_backward_inputs(options, args);
  const Layout s = layout_of(args.x, args.R, args.W_hr, args.lengths, packed);
  const int64_t GH = gate_count(options) * s.hidden_size;
  const Output none{py::none(), TensorView{}};
  const DType dtype = args.x.dtype, cell_dtype = cell_state_dtype(args.x.dtype);
  Output dx = outputs(s.per_step(s.input_size), dtype);
  Output dh0 = outputs({s.batch, s.output_size}, dtype);
  Output dc0 = options.cell == CellType::lstm ? outputs({s.batch, s.hidden_size}, cell_dtype) : none;
  Output dW = outputs({GH, s.input_size}, dtype);
  Output dR = outputs({GH, s.output_size}, dtype);
  Output dbW = has_bW ? outputs({GH}, dtype) : none;
  Output dbR = has_bR ? outputs({GH}, dtype) : none;
  Output dP = options.peephole ? outputs({3, s.hidden_size}, dtype) : none;
  Output dW_hr = args.W_hr.present() ? outputs({s.output_size, s.hidden_size}, dtype) : none;
  std::vector<Output> d_layer_norm;
  if (options.layer_norm) {
    d_layer_norm = {outputs({GH}, dtype), outputs({GH}, dtype)};
    if (options.cell == CellType::lstm) {
      d_layer_norm.push_back(outputs({s.hidden_size}, dtype));
      d_layer_norm.push_back(outputs({s.hidden_size}, dtype));
    }
  }
  TensorView* gain_grads[] = {&args.dgamma_x, &args.dgamma_h, &args.dgamma_c, &args.dbeta_c};
  py::list d_gains;
  for (size_t k = 0; k < d_layer_norm.size(); ++k) {
    *gain_grads[k] = d_layer_norm[k].second;
    d_gains.append(d_layer_norm[k].first);
  }
  args.dx = dx.second;
  args.dh0 = dh0.second;
  args.dc0 = dc0.second;
  args.dW = dW.second;
  args.dR = dR.second;
  args.dbW = dbW.second;
  args.dbR = dbR.second;
  args.dP = dP.second;
  args.dW_hr = dW_hr.second;
  {
    py::gil_scoped_release release;
    conveyor::backward(options, args, reinterpret_cast<void*>(stream));
  }
  return py::make_tuple(dx.first, dh0.first, dc0.first, dW.first, dR.first, dbW.first, dbR.first, dP.first,
                        dW_hr.first, options.layer_norm ? py::object(py::tuple(d_gains)) : py::object(py::none()));
}

py::tuple forward_numpy(const std::string& cell, const py::dict& options, const py::object& x, const py::object& W,
                        const py::object& R, const py::object& bW, const py::object& bR, const py::object& h0,
                        const py::object& c0, const py::object& P, const py::object& W_hr, const py::object& layer_norm,
                        const py::object& lengths,
                        bool packed, bool training) {
  NumpyViews views;
  return run_forward(cell_options(cell, options), views, NumpyOutputs{}, x, W, R, bW, bR, h0, c0, P, W_hr, layer_norm,
  lengths,
                     packed, training, 0);
}

py::tuple backward_numpy(const std::string& cell, const py::dict& options, const py::object& x, const py::object& W,
                         const py::object& R, const py::object& h0, const py::object& c0, const py::object& P,
                         const py::object& W_hr, const py::object& layer_norm, const py::object& y,
                         const py::object& cache, const py::object& dy,
                         const py::object& dh_T, const py::object& dc_T, const py::object& lengths, bool packed,
                         bool has_bW, bool has_bR) {
  NumpyViews views;
  return run_backward(cell_options(cell, options), views, NumpyOutputs{}, x, W, R, h0, c0, P, W_hr, layer_norm, y,
  cache, dy,
                      dh_T, dc_T, lengths, packed, has_bW, has_bR, 0);
}

py::tuple forward_dlpack(const std::string& cell, const py::dict& options, const py::object& x, const py::object& W,
                         const py::object& R, const py::object& bW, const py::object& bR, const py::object& h0,
                         const py::object& c0, const py::object& P, const py::object& W_hr,
                         const py::object& layer_norm, const py::object& lengths,
                         bool packed, bool training, const py::function& allocate, int64_t stream) {
  DLPackViews views(stream);
  return run_forward(cell_options(cell, options), views, DLPackOutputs{allocate, views}, x, W, R, bW, bR, h0, c0, P,
                     W_hr, layer_norm, lengths, packed, training, stream);
}

py::tuple backward_dlpack(const std::string& cell, const py::dict& options, const py::object& x, const py::object& W,
                          const py::object& R, const py::object& h0, const py::object& c0, const py::object& P,
                          const py::object& W_hr, const py::object& layer_norm, const py::object& y,
                          const py::object& cache, const py::object& dy,
                          const py::object& dh_T, const py::object& dc_T, const py::object& lengths, bool packed,
                          bool has_bW, bool has_bR, const py::function& allocate, int64_t stream) {
  DLPackViews views(stream);
  return run_backward(cell_options(cell, options), views, DLPackOutputs{allocate, views}, x, W, R, h0, c0, P, W_hr,
                      layer_norm, y, cache, dy, dh_T, dc_T, lengths, packed, has_bW, has_bR, stream);
}

// Fills `out` (NumPy, or any DLPack array) with dropout_mask(); returns it.
py::object dropout_mask_into(double p, bool variational, uint64_t seed, uint64_t mask_stream, const py::object& out,
                             int64_t stream) {
  DLPackViews views(stream);
  const TensorView view = views("out", out);
  {
    py::gil_scoped_release release;
    conveyor::dropout_mask(p, variational, seed, mask_stream, view, reinterpret_cast<void*>(stream));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_conveyor, m) {
  m.doc() = "Conveyor's compiled core: the C++ API over NumPy and DLPack arrays. Use the conveyor package instead.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const DTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const ArgumentError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("forward", &forward_numpy, py::arg("cell"), py::arg("options"), py::arg("x"), py::arg("W"), py::arg("R"),
        py::arg("bW"), py::arg("bR"), py::arg("h0"), py::arg("c0"), py::arg("P"), py::arg("W_hr"),
        py::arg("layer_norm"),
        py::arg("lengths"), py::arg("packed"), py::arg("training"));
  m.def("backward", &backward_numpy, py::arg("cell"), py::arg("options"), py::arg("x"), py::arg("W"), py::arg("R"),
        py::arg("h0"), py::arg("c0"), py::arg("P"), py::arg("W_hr"), py::arg("layer_norm"), py::arg("y"),
        py::arg("cache"), py::arg("dy"),
        py::arg("dh_T"), py::arg("dc_T"), py::arg("lengths"), py::arg("packed"), py::arg("has_bW"),
        py::arg("has_bR"));
  m.def("forward_dlpack", &forward_dlpack, py::arg("cell"), py::arg("options"), py::arg("x"), py::arg("W"),
        py::arg("R"), py::arg("bW"), py::arg("bR"), py::arg("h0"), py::arg("c0"), py::arg("P"), py::arg("W_hr"),
        py::arg("layer_norm"),
        py::arg("lengths"), py::arg("packed"), py::arg("training"), py::arg("allocate"), py::arg("stream"));
  m.def("backward_dlpack", &backward_dlpack, py::arg("cell"), py::arg("options"), py::arg("x"), py::arg("W"),
        py::arg("R"), py::arg("h0"), py::arg("c0"), py::arg("P"), py::arg("W_hr"), py::arg("layer_norm"), py::arg("y"),
        py::arg("cache"),
        py::arg("dy"), py::arg("dh_T"), py::arg("dc_T"), py::arg("lengths"), py::arg("packed"), py::arg("has_bW"),
        py::arg("has_bR"), py::arg("allocate"), py::arg("stream"));
  m.def("gate_count", [](const std::string& cell, const py::dict& options) {
    return gate_count(cell_options(cell, options));
  }, py::arg("cell"), py::arg("options") = py::dict());
  m.def("dropout_mask", &dropout_mask_into, py::arg("p"), py::arg("variational"), py::arg("seed"),
        py::arg("mask_stream"), py::arg("out"), py::arg("stream"));
  m.def("cuda_built", &cuda_built);
  m.def("cuda_available", &cuda_available);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_emulated", &detail::cuda_backend_emulated);
  // Device memory and streams for tests/device_arrays.py (core/backends.h); not for users.
  m.def("_device_malloc", &detail::cuda_test_malloc, py::arg("device"), py::arg("nbytes"));
  m.def("_device_free", &detail::cuda_test_free, py::arg("device"), py::arg("address"));
  m.def("_copy_to_device", [](int device, uintptr_t address, const py::buffer& host) {
    const py::buffer_info info = host.request();
    detail::cuda_test_copy(device, address, reinterpret_cast<uintptr_t>(info.ptr), size_t(info.size * info.itemsize),
                           true);
  }, py::arg("device"), py::arg("address"), py::arg("host"));
  m.def("_copy_to_host", [](int device, const py::buffer& host, uintptr_t address) {
    const py::buffer_info info = host.request(true);
    detail::cuda_test_copy(device, reinterpret_cast<uintptr_t>(info.ptr), address, size_t(info.size * info.itemsize),
                           false);
  }, py::arg("device"), py::arg("host"), py::arg("address"));
  m.def("_stream_create", &detail::cuda_test_stream_create, py::arg("device"));
  m.def("_stream_destroy", &detail::cuda_test_stream_destroy, py::arg("device"), py::arg("stream"));
  m.def("_synchronize", &detail::cuda_test_synchronize, py::arg("device"), py::arg("stream") = 0);
  m.def("_pool_release_threshold", &detail::cuda_test_pool_release_threshold, py::arg("device"));
  // The time-parallel products on device addresses (core/backends.h), for tests and bench/gemm.py.
  m.def("_gemm", [](const std::string& kind, const std::string& dtype_name, int64_t M, int64_t N, int64_t K,
                    uintptr_t a, uintptr_t b, uintptr_t c, bool a_transposed, bool b_transposed, bool accumulate,
                    bool allow_tf32, uintptr_t stream) {
    py::gil_scoped_release release;
    detail::cuda_test_gemm(kind, dtype_name, M, N, K, a, a_transposed, b, b_transposed, c, accumulate, allow_tf32,
                           stream);
  }, py::arg("kind"), py::arg("dtype_name"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a"), py::arg("b"),
        py::arg("c"), py::kw_only(), py::arg("a_transposed") = false, py::arg("b_transposed") = false,
        py::arg("accumulate") = false, py::arg("allow_tf32") = false, py::arg("stream") = 0);
  // The persistent kernels' floor for the benchmarks (core/backends.h); queued on `stream`, timed by the caller.
  m.def("_persistent_floor", [](int64_t steps, int64_t batch, int64_t hidden, const std::string& dtype_name,
                                int64_t stream, const std::string& cell, const std::string& direction) {
    if (direction != "forward" && direction != "backward") {
      throw py::value_error("direction: expected 'forward' or 'backward', got '" + direction + "'");
    }
    const CellOptions options = cell_options(cell, py::dict());
    detail::PersistentFloorLaunch launched;
    {
      py::gil_scoped_release release;
      launched = detail::cuda_persistent_floor(options, steps, batch, hidden, dtype_name, direction == "backward",
                                               reinterpret_cast<void*>(stream));
    }
    py::dict out;
    out["blocks"] = launched.blocks;
    out["units"] = launched.units;
    out["shared_bytes"] = launched.shared_bytes;
    out["multiprocessors"] = launched.multiprocessors;
    return out;
  }, py::arg("steps"), py::arg("batch"), py::arg("hidden"), py::arg("dtype_name"), py::arg("stream"),
        py::arg("cell") = "lstm", py::arg("direction") = "forward");
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("share_openmp_threads", &share_openmp_threads, py::arg("share") = true);
  m.def("sharing_openmp_threads", &sharing_openmp_threads);
  m.def("use_amx", &use_amx, py::arg("on") = true);
  m.def("using_amx", &using_amx);
  m.def("_last_parallel_runtime", []() {
    switch (cpu::last_parallel_runtime()) {
      case cpu::ParallelRuntime::pool: return "pool";
      case cpu::ParallelRuntime::openmp: return "openmp";
      default: return "none";
    }
  });
  m.def("_set_check_openmp_team", &cpu::set_check_openmp_team, py::arg("check"));
  m.def("_set_poison_outputs", [](bool on) { poison_outputs = on; }, py::arg("on"));
  m.def("_poison_outputs", []() { return poison_outputs; });
  m.attr("__version__") = version();
}
