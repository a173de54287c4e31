// One LSTM window, forward then backward, in float32 on the CPU through the public C++ API.
//
// Build Conveyor and install it under a prefix (add -DCONVEYOR_CUDA=OFF for a CPU-only library), then build
// this project against that prefix:
//   cmake -B build && cmake --build build && cmake --install build --prefix /tmp/p     # in the repository root
//   cd examples/cpp
//   cmake -B build -DCMAKE_PREFIX_PATH=/tmp/p && cmake --build build && ./build/example
//
// It prints the shape of y, the final hidden state of batch row 0 (h_T[0]) and the norm of dW for the loss
// L = sum(y) (so dy is all ones).
#include <conveyor/conveyor.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  using namespace conveyor;
  const int64_t T = 5, B = 3, I = 4, H = 8;  // steps, batch rows, input_size, hidden_size
  CellOptions options;
  options.cell = CellType::lstm;
  const int64_t G = gate_count(options), C = cache_width(options);

  // Small random inputs and weights; zero initial state (h0, c0 absent).
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  auto random = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& e : v) e = uniform(rng);
    return v;
  };
  std::vector<float> x = random(T * B * I), W = random(G * H * I), R = random(G * H * H), bW = random(G * H),
                     bR = random(G * H);
  std::vector<float> y(T * B * H), h_T(B * H), c_T(B * H), cache(T * B * C * H);
  auto view = [](std::vector<float>& v, std::initializer_list<int64_t> shape) {
    return TensorView::contiguous(v.data(), DType::float32, shape);
  };

  try {
    ForwardArgs f;
    f.x = view(x, {T, B, I});
    f.W = view(W, {G * H, I});
    f.R = view(R, {G * H, H});
    f.bW = view(bW, {G * H});
    f.bR = view(bR, {G * H});
    f.y = view(y, {T, B, H});
    f.h_T = view(h_T, {B, H});
    f.c_T = view(c_T, {B, H});
    f.cache = view(cache, {T, B, C * H});  // training mode: keep what backward() needs
    forward(options, f);

    std::vector<float> dy(T * B * H, 1.0f);  // L = sum(y)
    std::vector<float> dx(T * B * I), dW(G * H * I), dR(G * H * H), dbW(G * H), dbR(G * H);
    BackwardArgs b;
    b.x = f.x;
    b.W = f.W;
    b.R = f.R;
    b.y = f.y;
    b.cache = f.cache;
    b.dy = view(dy, {T, B, H});
    b.dx = view(dx, {T, B, I});
    b.dW = view(dW, {G * H, I});
    b.dR = view(dR, {G * H, H});
    b.dbW = view(dbW, {G * H});
    b.dbR = view(dbR, {G * H});
    backward(options, b);

    std::printf("conveyor %s, cuda_built=%d\n", version(), cuda_built() ? 1 : 0);
    std::printf("y shape: %s\n", shape_string(f.y).c_str());
    std::printf("h_T[0]:");
    for (int64_t j = 0; j < H; ++j) std::printf(" %.6f", h_T[static_cast<size_t>(j)]);
    std::printf("\n");
    double norm = 0;
    for (float v : dW) norm += double(v) * double(v);
    std::printf("|dW|: %.6f\n", std::sqrt(norm));
  } catch (const std::exception& e) {  // ArgumentError, DTypeError, CudaError
    std::fprintf(stderr, "conveyor error: %s\n", e.what());
    return 1;
  }
  return 0;
}
