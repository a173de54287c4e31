// Trains a one-layer LSTM through the public C++ API: forward, backward and a plain SGD step, on a toy
// sequence task (at every step, output the bit the input carried 3 steps earlier), printing the loss as it
// falls. The readout (a linear layer and a sigmoid) is a few lines here; the recurrent layer is Conveyor's.
//
// Build Conveyor and install it under a prefix (add -DCONVEYOR_CUDA=OFF for a CPU-only library), then build
// this project against that prefix:
//   cmake -B build && cmake --build build && cmake --install build --prefix /tmp/p     # in the repository root
//   cd examples/cpp
//   cmake -B build -DCMAKE_PREFIX_PATH=/tmp/p && cmake --build build && ./build/example
//
// It exits with status 1 if the loss has not fallen to under half its first value.
#include <conveyor/conveyor.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using Vec = std::vector<float>;
constexpr int64_t T = 24, B = 16, I = 1, H = 16, kDelay = 3, kSteps = 1500;
constexpr float kLearningRate = 1.0f;

conveyor::TensorView view(Vec& v, std::initializer_list<int64_t> shape) {
  return conveyor::TensorView::contiguous(v.data(), conveyor::DType::float32, shape);
}

}  // namespace

int main() {
  using namespace conveyor;
  CellOptions options;  // an LSTM with tanh
  const int64_t G = gate_count(options), GH = G * H, C = cache_width(options) * H;

  std::mt19937 rng(0);
  std::uniform_real_distribution<float> init(-1.0f / std::sqrt(float(H)), 1.0f / std::sqrt(float(H)));
  auto random = [&](int64_t n) {
    Vec v(static_cast<size_t>(n));
    for (float& e : v) e = init(rng);
    return v;
  };
  Vec W = random(GH * I), R = random(GH * H), bW = random(GH), bR = random(GH), readout = random(H);
  float readout_bias = 0.0f;
  Vec x(T * B * I), target(T * B), y(T * B * H), cache(T * B * C), dy(T * B * H);
  Vec dx(T * B * I), dW(GH * I), dR(GH * H), dbW(GH), dbR(GH);
  std::bernoulli_distribution bit(0.5);

  float first_loss = -1.0f, loss = 0.0f;
  try {
    for (int64_t step = 1; step <= kSteps; ++step) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = 0; b < B; ++b) {
          x[t * B + b] = bit(rng) ? 1.0f : 0.0f;
          target[t * B + b] = t >= kDelay ? x[(t - kDelay) * B + b] : 0.0f;
        }
      }
      ForwardArgs f;
      f.x = view(x, {T, B, I});
      f.W = view(W, {GH, I});
      f.R = view(R, {GH, H});
      f.bW = view(bW, {GH});
      f.bR = view(bR, {GH});
      f.y = view(y, {T, B, H});
      f.cache = view(cache, {T, B, C});
      forward(options, f);

      // Readout p = sigmoid(readout . y_t + bias), binary cross-entropy over the steps that recall a bit.
      loss = 0.0f;
      float d_bias = 0.0f;
      Vec d_readout(H, 0.0f);
      const float n = float((T - kDelay) * B);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = 0; b < B; ++b) {
          const float* h = &y[(t * B + b) * H];
          float* dh = &dy[(t * B + b) * H];
          float logit = readout_bias;
          for (int64_t j = 0; j < H; ++j) logit += readout[j] * h[j];
          const float p = 1.0f / (1.0f + std::exp(-logit));
          const float q = target[t * B + b];
          const float dlogit = t >= kDelay ? (p - q) / n : 0.0f;
          if (t >= kDelay) loss -= (q * std::log(p + 1e-7f) + (1 - q) * std::log(1 - p + 1e-7f)) / n;
          d_bias += dlogit;
          for (int64_t j = 0; j < H; ++j) {
            d_readout[j] += dlogit * h[j];
            dh[j] = dlogit * readout[j];
          }
        }
      }
      if (first_loss < 0) first_loss = loss;

      BackwardArgs bk = backward_args_for(f);
      bk.dy = view(dy, {T, B, H});
      bk.dx = view(dx, {T, B, I});
      bk.dW = view(dW, {GH, I});
      bk.dR = view(dR, {GH, H});
      bk.dbW = view(dbW, {GH});
      bk.dbR = view(dbR, {GH});
      backward(options, bk);

      auto sgd = [](Vec& p, const Vec& g) {
        for (size_t k = 0; k < p.size(); ++k) p[k] -= kLearningRate * g[k];
      };
      sgd(W, dW);
      sgd(R, dR);
      sgd(bW, dbW);
      sgd(bR, dbR);
      sgd(readout, d_readout);
      readout_bias -= kLearningRate * d_bias;
      if (step == 1 || step % 150 == 0) std::printf("step %3lld  loss %.4f\n", static_cast<long long>(step), loss);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conveyor: %s\n", e.what());
    return 2;
  }
  std::printf("loss %.4f -> %.4f (conveyor %s, CUDA backend %s)\n", first_loss, loss, version(),
              cuda_built() ? "built" : "not built");
  return loss < 0.5f * first_loss ? 0 : 1;
}
