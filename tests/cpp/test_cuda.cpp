// Checks the CUDA backend through the public C++ API: device pointers and a cudaStream_t in, results equal
// (float64, within the reference tolerance) to the CPU backend's, for every cell, with outputs poisoned with
// NaN before each call and accumulate = true adding to what the parameter gradients held; and with DropConnect
// and zoneout, whose dR (M times the gradient of R * M) is added to what dR held. Built only with the
// CUDA backend. Without a CUDA device the device-independent checks still run (mixed devices are refused
// before anything touches a GPU) and the rest is skipped (exit code 77, which ctest reports as skipped).
#include <conveyor/conveyor.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "device_array.h"

namespace {

using namespace conveyor;
using Vec = std::vector<double>;

constexpr int kSkipped = 77;

using conveyor_test::cuda_ok;
using DeviceArray = conveyor_test::DeviceArray<double>;

TensorView on(double* data, std::initializer_list<int64_t> shape, Device device) {
  return TensorView::contiguous(data, DType::float64, shape, device);
}

Vec random(size_t n, std::mt19937& gen, double scale) {
  std::uniform_real_distribution<double> u(-scale, scale);
  Vec v(n);
  for (double& e : v) e = u(gen);
  return v;
}

Vec poisoned(size_t n) { return Vec(n, std::nan("")); }

void check_close(const char* what, const char* name, const Vec& got, const Vec& expected) {
  bool ok = got.size() == expected.size();
  size_t worst = 0;
  for (size_t i = 0; ok && i < got.size(); ++i) {
    if (!conveyor_test::near(got[i], expected[i], 1e-11, 1e-9)) {
      ok = false;
      worst = i;
    }
  }
  CHECK_MSG(ok, std::string(what) + ": " + name + " differs at " + std::to_string(worst) + ": " +
                    (worst < got.size() ? std::to_string(got[worst]) + " vs " + std::to_string(expected[worst]) : ""));
}

// One window on the CPU and on device 0 (with the CUDA backend's `algorithm`), forward and backward (with
// accumulate), compared.
void compare_backends(const char* what, CellOptions options, Algorithm algorithm, int64_t T, int64_t B, int64_t I,
                      int64_t H, std::mt19937& gen) {
  const int64_t G = gate_count(options), GH = G * H, cw = cache_width(options) * H;
  const bool lstm = options.cell == CellType::lstm;
  const double w = 1.0 / std::sqrt(double(H));
  const Vec x = random(T * B * I, gen, 1), W = random(GH * I, gen, w), R = random(GH * H, gen, w);
  const Vec bW = random(GH, gen, w), bR = random(GH, gen, w), h0 = random(B * H, gen, 0.5);
  const Vec c0 = random(B * H, gen, 0.5), dy = random(T * B * H, gen, 1), dh_T = random(B * H, gen, 1);
  const Vec dc_T = random(B * H, gen, 1), dW_before = random(GH * I, gen, 1), dR_before = random(GH * H, gen, 1);

  // Host and device copies of everything, outputs poisoned.
  struct Arrays {
    Vec y, h_T, c_T, cache, dx, dh0, dc0, dW, dR, dbW, dbR;
  };
  Arrays cpu{poisoned(T * B * H), poisoned(B * H), poisoned(B * H), poisoned(T * B * cw), poisoned(T * B * I),
             poisoned(B * H),     poisoned(B * H), dW_before,       dR_before,            poisoned(GH),
             poisoned(GH)};
  const Device host{}, gpu{DeviceKind::cuda, 0};
  DeviceArray dx_(x), dW_(W), dR_(R), dbW_(bW), dbR_(bR), dh0_(h0), dc0_(c0), ddy(dy), ddh_T(dh_T), ddc_T(dc_T);
  DeviceArray gy(cpu.y), gh_T(cpu.h_T), gc_T(cpu.c_T), gcache(cpu.cache), gdx(cpu.dx), gdh0(cpu.dh0), gdc0(cpu.dc0),
      gdW(cpu.dW), gdR(cpu.dR), gdbW(cpu.dbW), gdbR(cpu.dbR);

  cudaStream_t stream = nullptr;
  cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
  for (int backend = 0; backend < 2; ++backend) {
    const bool on_gpu = backend == 1;
    const Device d = on_gpu ? gpu : host;
    auto in = [&](const Vec& v, const DeviceArray& g) { return on_gpu ? g.get() : const_cast<double*>(v.data()); };
    auto out = [&](Vec& v, const DeviceArray& g) { return on_gpu ? g.get() : v.data(); };
    ForwardArgs f;
    f.x = on(in(x, dx_), {T, B, I}, d);
    f.W = on(in(W, dW_), {GH, I}, d);
    f.R = on(in(R, dR_), {GH, H}, d);
    f.bW = on(in(bW, dbW_), {GH}, d);
    f.bR = on(in(bR, dbR_), {GH}, d);
    f.h0 = on(in(h0, dh0_), {B, H}, d);
    if (lstm) f.c0 = on(in(c0, dc0_), {B, H}, d);
    f.y = on(out(cpu.y, gy), {T, B, H}, d);
    f.h_T = on(out(cpu.h_T, gh_T), {B, H}, d);
    if (lstm) f.c_T = on(out(cpu.c_T, gc_T), {B, H}, d);
    if (cw > 0) f.cache = on(out(cpu.cache, gcache), {T, B, cw}, d);
    CellOptions backend_options = options;
    if (on_gpu) backend_options.algorithm = algorithm;
    forward(backend_options, f, on_gpu ? stream : nullptr);

    BackwardArgs b = backward_args_for(f);
    b.dy = on(in(dy, ddy), {T, B, H}, d);
    b.dh_T = on(in(dh_T, ddh_T), {B, H}, d);
    if (lstm) b.dc_T = on(in(dc_T, ddc_T), {B, H}, d);
    b.dx = on(out(cpu.dx, gdx), {T, B, I}, d);
    b.dh0 = on(out(cpu.dh0, gdh0), {B, H}, d);
    if (lstm) b.dc0 = on(out(cpu.dc0, gdc0), {B, H}, d);
    b.dW = on(out(cpu.dW, gdW), {GH, I}, d);
    b.dR = on(out(cpu.dR, gdR), {GH, H}, d);
    b.dbW = on(out(cpu.dbW, gdbW), {GH}, d);
    b.dbR = on(out(cpu.dbR, gdbR), {GH}, d);
    b.accumulate = true;
    // accumulate adds to dW and dR (which start as dW_before and dR_before on both backends); the others must
    // be written first.
    if (!on_gpu) {
      cpu.dbW.assign(GH, 0.0);
      cpu.dbR.assign(GH, 0.0);
    } else {
      cuda_ok(cudaMemset(gdbW.get(), 0, sizeof(double) * GH), "cudaMemset");
      cuda_ok(cudaMemset(gdbR.get(), 0, sizeof(double) * GH), "cudaMemset");
    }
    backward(backend_options, b, on_gpu ? stream : nullptr);
  }
  cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");

  check_close(what, "y", gy.to_host(), cpu.y);
  check_close(what, "h_T", gh_T.to_host(), cpu.h_T);
  if (lstm) check_close(what, "c_T", gc_T.to_host(), cpu.c_T);
  check_close(what, "dx", gdx.to_host(), cpu.dx);
  check_close(what, "dh0", gdh0.to_host(), cpu.dh0);
  if (lstm) check_close(what, "dc0", gdc0.to_host(), cpu.dc0);
  check_close(what, "dW (accumulated)", gdW.to_host(), cpu.dW);
  check_close(what, "dR (accumulated)", gdR.to_host(), cpu.dR);
  check_close(what, "dbW", gdbW.to_host(), cpu.dbW);
  check_close(what, "dbR", gdbR.to_host(), cpu.dbR);
}

// Device-independent: a CUDA x with a CPU W is refused by the checks, before any CUDA call.
void mixed_devices_are_refused() {
  CellOptions options;
  double storage[64] = {};
  ForwardArgs f;
  f.x = on(storage, {1, 1, 1}, Device{DeviceKind::cuda, 0});
  f.W = on(storage, {4, 1}, Device{});
  f.R = on(storage, {4, 1}, Device{DeviceKind::cuda, 0});
  try {
    check_forward_inputs(options, f);
    CHECK_MSG(false, "a CPU W with a CUDA x was accepted");
  } catch (const ArgumentError& e) {
    CHECK_MSG(std::string(e.what()).find("W: expected an array on cuda:0 (the device of x), got one on cpu") == 0,
              std::string("message: ") + e.what());
  }
}

}  // namespace

int main() {
  mixed_devices_are_refused();
  if (cuda_device_count() == 0) {
    std::printf("no CUDA device: the device comparisons are skipped\n");
    conveyor_test::report();
    return conveyor_test::counts().failed == 0 ? kSkipped : 1;
  }
  std::mt19937 gen(7);
  struct Case {
    const char* name;
    CellOptions options;
  };
  // DropConnect and zoneout (sampled), on the options of a case.
  auto regularised = [](CellOptions options) {
    options.weight_dropout = 0.3;
    options.weight_dropout_stream = 5;
    options.dropout_seed = 11;
    if (options.cell != CellType::rnn) options.zoneout = 0.2;
    if (options.cell == CellType::lstm) options.zoneout_cell = 0.25;
    options.zoneout_stream = 6;
    options.zoneout_cell_stream = 7;
    return options;
  };
  const Case cases[] = {
      {"lstm", {CellType::lstm, Activation::tanh, true}},
      {"lstm dropconnect zoneout", regularised({CellType::lstm, Activation::tanh, true})},
      {"gru reset_before dropconnect zoneout", regularised({CellType::gru, Activation::tanh, false})},
      {"rnn dropconnect", regularised({CellType::rnn, Activation::relu, true})},
      {"lstm relu", {CellType::lstm, Activation::relu, true}},
      {"gru reset_after", {CellType::gru, Activation::tanh, true}},
      {"gru reset_before", {CellType::gru, Activation::tanh, false}},
      {"gru reset_before relu", {CellType::gru, Activation::relu, false}},
      {"rnn tanh", {CellType::rnn, Activation::tanh, true}},
      {"rnn relu", {CellType::rnn, Activation::relu, true}},
  };
  for (const Algorithm algorithm : {Algorithm::per_step, Algorithm::persistent}) {
    for (const Case& c : cases) {
      const std::string what = std::string(c.name) + " " + algorithm_name(algorithm);
      compare_backends(what.c_str(), c.options, algorithm, 5, 3, 4, 7, gen);
      compare_backends(what.c_str(), c.options, algorithm, 3, 20, 70, 40, gen);
    }
  }
  return conveyor_test::report();
}
