// The pybind11 module conveyor._conveyor. It does four things and no math: turns NumPy arrays into
// TensorViews (rejecting what is not an array, with the argument's name), allocates the outputs, releases
// the GIL, and calls the C++ API, whose ArgumentError/DTypeError/CudaError become ValueError/TypeError/
// RuntimeError with the message intact.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "conveyor/conveyor.h"

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
  const char kind = array.dtype().kind();
  const auto itemsize = array.itemsize();
  if (kind == 'f' && itemsize == 4) {
    v.dtype = DType::float32;
  } else if (kind == 'f' && itemsize == 8) {
    v.dtype = DType::float64;
  } else if (kind == 'f' && itemsize == 2) {
    v.dtype = DType::float16;
  } else {
    throw py::type_error(std::string(name) + ": expected a float32 or float64 array, got dtype " +
                         std::string(py::str(array.dtype())));
  }
  if (!array.dtype().attr("isnative").cast<bool>()) {
    throw py::type_error(std::string(name) + ": expected native byte order, got dtype " +
                         std::string(py::str(array.dtype().attr("str"))) + " (convert with .astype(np.float32))");
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

py::array new_output(const py::dtype& dtype, std::vector<py::ssize_t> shape) {
  py::array out(dtype, shape);
  if (poison_outputs) {
    out.attr("fill")(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

TensorView output_view(py::array& out) { return view_of("output", out); }

CellOptions cell_options(const std::string& cell, const std::string& activation, bool reset_after) {
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
  if (activation == "tanh") {
    o.activation = Activation::tanh;
  } else if (activation == "relu") {
    o.activation = Activation::relu;
  } else {
    throw py::value_error("activation: expected 'tanh' or 'relu', got '" + activation + "'");
  }
  o.reset_after = reset_after;
  return o;
}

py::object or_none(bool present, py::array& array) { return present ? py::object(array) : py::none(); }

// (y, h_T, c_T or None, cache or None)
py::tuple forward_numpy(const std::string& cell, const std::string& activation, bool reset_after, const py::object& x,
                  const py::object& W, const py::object& R, const py::object& bW, const py::object& bR,
                  const py::object& h0, const py::object& c0, bool training) {
  const CellOptions options = cell_options(cell, activation, reset_after);
  ForwardArgs args;
  args.x = view_of("x", x);
  args.W = view_of("W", W);
  args.R = view_of("R", R);
  args.bW = optional_view_of("bW", bW);
  args.bR = optional_view_of("bR", bR);
  args.h0 = optional_view_of("h0", h0);
  args.c0 = optional_view_of("c0", c0);
  check_forward_inputs(options, args);
  const WindowSizes s = window_sizes(options, args.x, args.W, args.R);
  const py::dtype dtype = py::reinterpret_borrow<py::array>(x).dtype();
  const bool lstm = options.cell == CellType::lstm;
  const bool caching = training && cache_width(options) > 0;
  py::array y = new_output(dtype, {s.steps, s.batch, s.hidden_size});
  py::array h_T = new_output(dtype, {s.batch, s.hidden_size});
  py::array c_T = new_output(dtype, {lstm ? s.batch : 0, lstm ? s.hidden_size : 0});
  py::array cache = new_output(dtype, {caching ? s.steps : 0, s.batch, cache_width(options) * s.hidden_size});
  args.y = output_view(y);
  args.h_T = output_view(h_T);
  if (lstm) args.c_T = output_view(c_T);
  if (caching) args.cache = output_view(cache);
  {
    py::gil_scoped_release release;
    conveyor::forward(options, args);
  }
  return py::make_tuple(y, h_T, or_none(lstm, c_T), or_none(training, cache));
}

// (dx, dh0, dc0 or None, dW, dR, dbW or None, dbR or None)
py::tuple backward_numpy(const std::string& cell, const std::string& activation, bool reset_after, const py::object& x,
                   const py::object& W, const py::object& R, const py::object& h0, const py::object& c0,
                   const py::object& y, const py::object& cache, const py::object& dy, const py::object& dh_T,
                   const py::object& dc_T, bool has_bW, bool has_bR) {
  const CellOptions options = cell_options(cell, activation, reset_after);
  BackwardArgs args;
  args.x = view_of("x", x);
  args.W = view_of("W", W);
  args.R = view_of("R", R);
  args.h0 = optional_view_of("h0", h0);
  args.c0 = optional_view_of("c0", c0);
  args.y = view_of("y", y);
  if (cache_width(options) > 0) args.cache = view_of("cache", cache);
  args.dy = view_of("dy", dy);
  args.dh_T = optional_view_of("dh_T", dh_T);
  args.dc_T = optional_view_of("dc_T", dc_T);
  check_backward_inputs(options, args);
  const WindowSizes s = window_sizes(options, args.x, args.W, args.R);
  const py::dtype dtype = py::reinterpret_borrow<py::array>(x).dtype();
  const bool lstm = options.cell == CellType::lstm;
  const int64_t GH = gate_count(options) * s.hidden_size;
  py::array dx = new_output(dtype, {s.steps, s.batch, s.input_size});
  py::array dh0 = new_output(dtype, {s.batch, s.hidden_size});
  py::array dc0 = new_output(dtype, {lstm ? s.batch : 0, lstm ? s.hidden_size : 0});
  py::array dW = new_output(dtype, {GH, s.input_size});
  py::array dR = new_output(dtype, {GH, s.hidden_size});
  py::array dbW = new_output(dtype, {has_bW ? GH : 0});
  py::array dbR = new_output(dtype, {has_bR ? GH : 0});
  args.dx = output_view(dx);
  args.dh0 = output_view(dh0);
  if (lstm) args.dc0 = output_view(dc0);
  args.dW = output_view(dW);
  args.dR = output_view(dR);
  if (has_bW) args.dbW = output_view(dbW);
  if (has_bR) args.dbR = output_view(dbR);
  {
    py::gil_scoped_release release;
    conveyor::backward(options, args);
  }
  return py::make_tuple(dx, dh0, or_none(lstm, dc0), dW, dR, or_none(has_bW, dbW), or_none(has_bR, dbR));
}

}  // namespace

PYBIND11_MODULE(_conveyor, m) {
  m.doc() = "Conveyor's compiled core: the C++ API over NumPy arrays. Use the conveyor package instead.";

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

  m.def("forward", &forward_numpy, py::arg("cell"), py::arg("activation"), py::arg("reset_after"), py::arg("x"),
        py::arg("W"), py::arg("R"), py::arg("bW"), py::arg("bR"), py::arg("h0"), py::arg("c0"),
        py::arg("training"));
  m.def("backward", &backward_numpy, py::arg("cell"), py::arg("activation"), py::arg("reset_after"), py::arg("x"),
        py::arg("W"), py::arg("R"), py::arg("h0"), py::arg("c0"), py::arg("y"), py::arg("cache"), py::arg("dy"),
        py::arg("dh_T"), py::arg("dc_T"), py::arg("has_bW"), py::arg("has_bR"));
  m.def("gate_count", [](const std::string& cell) { return gate_count(cell_options(cell, "tanh", true)); },
        py::arg("cell"));
  m.def("cuda_built", &cuda_built);
  m.def("cuda_available", &cuda_available);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("_set_poison_outputs", [](bool on) { poison_outputs = on; }, py::arg("on"));
  m.attr("__version__") = version();
}
