// Conveyor: LSTM, GRU and RNN layers over a window of time steps.
//
// This umbrella header is the whole public C++ API. It includes no CUDA header, so a program that never
// touches a GPU can include it and link conveyor::conveyor.
//
// Sizes, used in every comment below:
//   T  steps in the window            B  batch rows
//   I  input_size                     H  hidden_size
//   G  gate blocks: LSTM 4 (i, f, g, o; 3 with coupled gates: f, g, o), GRU 3 (r, z, n), RNN 1
//   P  the LSTM's projection size (LSTMP, W_hr [P, H]); without a projection P = H
//
// Memory layout. Every array is a dense row-major (C-contiguous) block described by a TensorView. Sequences
// are time-major: x is [T, B, I], y is [T, B, P]. Weights follow PyTorch, so a torch.nn.LSTM/GRU/RNN state
// dict loads unchanged: W [G*H, I] (weight_ih), R [G*H, H] (weight_hh), bW and bR [G*H] (bias_ih, bias_hh),
// gate blocks stacked along the first axis in the order above.
//
// Element types. Every array of one call has the dtype of x, but for the LSTM's cell-state arrays (c0 and c_T
// of forward(), c0, dc_T and dc0 of backward()), which have cell_state_dtype(x's dtype): float32 when x is
// float16 or bfloat16 (CUDA keeps the cell state in float32 beside 16-bit storage, so that c_T hands on
// exactly the state the window carried, and windows chained through (h_T, c_T) give exactly the outputs of
// one call), x's dtype otherwise.
//
// Memory spaces. All views passed to one call live on one device: the CPU (host memory) or one CUDA device
// (device memory, work queued on the `stream` argument). A mismatch is an ArgumentError, never a crash.
//
// Outputs. Each output comment says whether the call writes it (=) or adds to it (+=). Outputs never alias
// inputs or each other unless the comment says so.
//
// Errors. A bad argument throws ArgumentError (wrong shape, layout, device, size) or DTypeError (wrong
// element type); the message names the argument and gives the expected and the actual value. A failing CUDA
// call throws CudaError naming the call. Nothing calls exit().
//
// Threads. forward() and backward() keep no state between calls and may run concurrently from several
// threads on distinct outputs. The CPU backend splits each call over a shared pool of worker threads
// (set_num_threads); a call that finds the pool busy runs on its own thread instead of waiting.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace conveyor {

// ---------------------------------------------------------------------------------------------------------
// Errors

// A shape, layout, size, device or option that the call cannot accept. Python sees ValueError.
class ArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// An element type that the call cannot accept. Python sees TypeError.
class DTypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A CUDA runtime call or kernel launch failed; the message names the call, file and line.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------------
// Arrays

// Element types (the CPU computes in float32 and float64; CUDA also stores float16 and bfloat16; the integer
// types are for `lengths` alone) and devices.
enum class DType : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3, int32 = 4, int64 = 5 };
enum class DeviceKind : int { cpu = 0, cuda = 1 };

// Where an array lives.
struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;  // CUDA device ordinal; 0 for the CPU
};

// The most dimensions a TensorView has.
constexpr int kMaxRank = 4;

// A non-owning view of an array: the caller keeps the memory alive for the duration of the call.
// A default-constructed view is "absent" (data == nullptr and rank == 0); arguments documented as optional
// accept it.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device{};
  int rank = 0;
  int64_t shape[kMaxRank] = {};
  int64_t strides[kMaxRank] = {};  // in elements, not bytes

  bool present() const { return data != nullptr || rank != 0; }
  int64_t numel() const;
  bool is_contiguous() const;

  // A C-contiguous view of `data` with the given shape.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = {});
};

// The dtype of the LSTM's cell-state arrays (c0, c_T, dc_T, dc0) for x of `x_dtype`: float32 for float16
// and bfloat16 x, `x_dtype` itself for float32 and float64.
DType cell_state_dtype(DType x_dtype);

// Names for messages: "float32", "cuda:0", and a shape written as "(2, 3, 4)".
const char* dtype_name(DType dtype);
std::string device_name(const Device& device);
std::string shape_string(const TensorView& view);

// ---------------------------------------------------------------------------------------------------------
// Cells

// The cell (docs/math.md, "Cells") and its activation act().
enum class CellType : int { lstm = 0, gru = 1, rnn = 2 };
enum class Activation : int { tanh = 0, relu = 1 };

// How the CUDA backend runs a window's recurrence. per_step: one launch per step (two for the GRU with
// reset_after = false), for any size. persistent: one cooperative launch for the whole window, each block
// keeping its slice of R on chip for all T steps and the grid synchronising once per step (twice for that
// GRU; layer normalisation adds one or two a step for its row statistics); it needs the slices to fit in shared
// memory and the blocks to be co-resident on the device, and runs no projection (W_hr): such a window runs
// per_step (DropConnect, zoneout and layer normalisation run on both). automatic: persistent wherever it can
// run and B <= 32 (where it was measured faster, on an H200), per_step elsewhere. The CPU backend has one
// algorithm: it takes automatic and refuses the others.
enum class Algorithm : int { automatic = 0, per_step = 1, persistent = 2 };

// What a window computes: the cell, its activation and its options (each documented below).
struct CellOptions {
  CellType cell = CellType::lstm;
  // The cell activation: LSTM's g and act(c_t), GRU's n, the RNN's output.
  Activation activation = Activation::tanh;
  // GRU only. true: n = act(W_n x + bW_n + r * (R_n h + bR_n)) (cuDNN, PyTorch, Keras).
  // false: n = act(W_n x + bW_n + R_n (r * h) + bR_n) (Cho et al. 2014).
  bool reset_after = true;
  // LSTM only (docs/math.md, "Cells"). peephole: i and f also see c_{t-1}, and o sees c_t, through diagonal
  // weights P = (p_i, p_f, p_o) (Gers & Schmidhuber 2000).
  bool peephole = false;
  // LSTM only. Coupled input and forget gates (CIFG, Greff et al. 2017): i = 1 - f, and W, R, bW, bR hold three
  // gate blocks f, g, o instead of four.
  bool coupled_gates = false;
  // LSTM only. A constant added to f's pre-activation (Jozefowicz et al. 2015 use 1). Finite.
  double forget_bias = 0;
  // LSTM only. > 0: c_t is clamped to [-cell_clip, cell_clip] (as in TensorFlow's LSTMCell). 0: no clip.
  double cell_clip = 0;
  // Dropout on h_{t-1} where it enters the recurrent product, R (m * h_{t-1}) (Gal & Ghahramani 2016): the
  // probability of dropping, in [0, 1); 0: none. m is dropout_mask(recurrent_dropout, variational,
  // dropout_seed, dropout_stream) over [T, B, H], its step counting the order the window runs (one mask for the
  // whole window when variational). Exact gradients given the mask; the GRU's output mix uses the unmasked
  // h_{t-1}.
  double recurrent_dropout = 0;
  bool variational = true;
  uint64_t dropout_seed = 0;
  uint64_t dropout_stream = 0;  // distinguishes the masks of layers and directions under one seed
  // DropConnect on the recurrent weights (Wan et al. 2013; the weight drop of Merity et al. 2017): the
  // probability of dropping each entry of R, in [0, 1); 0: none. The window runs on R * M with the one mask
  // M[r, k] = dropout_mask value of (dropout_seed, weight_dropout_stream, row r, unit k, step 0) (an [1, G*H, P]
  // dropout_mask, variational), 0 or 1 / (1 - p); dR is M times the gradient of R * M.
  double weight_dropout = 0;
  uint64_t weight_dropout_stream = 0;
  // Zoneout (Krueger et al. 2017), LSTM and GRU: h_t = d h_{t-1} + (1 - d) h~_t, h~_t the cell's own output,
  // per (step, row, unit); the LSTM's c likewise with zoneout_cell. Probabilities in [0, 1); 0: none.
  // zoneout_sample: d is 1 with probability z, else 0, drawn as dropout's masks are from (dropout_seed,
  // zoneout_stream or zoneout_cell_stream, b, u, step) (training); false: d = z, the expectation (evaluation).
  // The step counts the order the window runs.
  double zoneout = 0;
  double zoneout_cell = 0;
  bool zoneout_sample = true;
  uint64_t zoneout_stream = 0;
  uint64_t zoneout_cell_stream = 0;
  // Layer normalisation (Ba et al. 2016, as Haste's LayerNormLSTM/GRU), LSTM and GRU with reset_after:
  // a = LN(W x_t; gamma_x) + bW + LN(R h_{t-1}; gamma_h) + bR, LN(v; gamma, beta) = gamma * (v - mean(v)) /
  // sqrt(var(v) + 1e-5) + beta over the G*H entries of a row; the LSTM's output is o * act(LN(c_t; gamma_c,
  // beta_c)) (its peepholes and c_T see the raw c_t). The gains are ForwardArgs' gamma_x, gamma_h (and the
  // LSTM's gamma_c, beta_c). The CUDA backend runs it on its per_step algorithm only (see Algorithm).
  bool layer_norm = false;
  // CUDA float32 only: the time-parallel products (input projection, dx, dW, dR) may run on tensor cores in
  // TF32 (inputs rounded to 10 mantissa bits, float32 accumulation). The recurrence itself stays float32.
  // Ignored by the CPU backend and by other dtypes.
  bool allow_tf32 = false;
  // The CUDA backend's algorithm for the recurrence (see Algorithm). Forcing persistent where it cannot run
  // throws ArgumentError saying why; set the environment variable CONVEYOR_LOG_ALGORITHM=1 to have every
  // CUDA window print the algorithm it ran on standard error.
  Algorithm algorithm = Algorithm::automatic;
};

// Names for messages: "lstm", "gru", "rnn"; "tanh", "relu".
const char* cell_name(CellType cell);
const char* activation_name(Activation activation);
const char* algorithm_name(Algorithm algorithm);  // "auto", "per_step", "persistent"

// G, the number of gate blocks in W, R, bW and bR.
int gate_count(const CellOptions& options);

// The number of H-wide columns that forward() saves per (step, batch row) for backward():
// LSTM 5 (i, f, g, o after their activations, c_t; a sixth with zoneout_cell, c_t after zoneout); GRU 4 (r,
// z, n, and R_n h + bR_n when reset_after, r * h when not); RNN 0 (backward reads y). Layer normalisation
// adds 2G (W x_t and R h_{t-1} before it). The cache is [T, B, cache_width * H]. A projection adds no column:
// backward recomputes o * act(c_t) from o and c_t.
int cache_width(const CellOptions& options);

// The sizes of one window, read off x and R (and W_hr, with a projection), and checked against W. Throws
// ArgumentError naming the argument when x is not [T, B, I], R is not [G*H, P], W is not [G*H, I] or W_hr is
// not [P, H], or a size is not positive.
struct WindowSizes {
  int64_t steps = 0;        // T
  int64_t batch = 0;        // B
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H
  int64_t output_size = 0;  // P: the units of h and y (H without a projection)
};
// Reads the sizes off x, W, R and W_hr (absent: no projection) as described above.
WindowSizes window_sizes(const CellOptions& options, const TensorView& x, const TensorView& W,
                         const TensorView& R, const TensorView& W_hr = {});

// ---------------------------------------------------------------------------------------------------------
// Forward over a window

// The arrays of forward(): inputs, then outputs.
struct ForwardArgs {
  // Inputs (read only).
  TensorView x;   // [T, B, I]
  TensorView W;   // [G*H, I]
  TensorView R;   // [G*H, P]
  TensorView bW;  // [G*H]; optional (absent: no input bias)
  TensorView bR;  // [G*H]; optional (absent: no recurrent bias)
  TensorView h0;  // [B, P] initial hidden state; optional (absent: zeros)
  TensorView c0;  // [B, H] initial cell state, LSTM only, of cell_state_dtype(x); optional (absent: zeros)
  TensorView P;   // [3, H] peephole weights p_i, p_f, p_o; required with peephole, else absent
  // [P, H] LSTM only; optional (absent: no projection). The projection of LSTMP (Sak et al. 2014, PyTorch's
  // proj_size): h_t = W_hr (o * act(c_t)), so that h, y and R's columns have P units while c keeps H. The
  // recurrent dropout mask (CellOptions) is then [T, B, P], over h_{t-1} as the product reads it.
  TensorView W_hr;
  // With layer_norm (CellOptions), else absent: the gains of LN(W x_t) and LN(R h_{t-1}) [G*H], and the LSTM's
  // gain and bias of LN(c_t) [H].
  TensorView gamma_x, gamma_h, gamma_c, beta_c;
  // [B] int32 or int64, on the CPU or x's device; optional (absent: every row runs all T steps). Row b runs
  // steps 0 .. lengths[b] - 1 only (1 <= lengths[b] <= T; in any order): its h_T and c_T are its state after
  // them, y is 0 at the steps after them, and those steps cost no arithmetic. A reverse direction is a
  // forward over each row's steps reversed within its length (the Python stacks do that). On CUDA, lengths
  // on the device are copied to the host first, which waits for `stream`'s work before them.
  TensorView lengths;
  // With lengths: the per-step arrays (x, y, cache here; backward's dy and dx) are packed as a PyTorch
  // PackedSequence's data is, instead of [T, B, ...]: [tokens, ...], step t's rows after step t-1's, each step
  // holding the rows longer than t. lengths must then be on the CPU and non-increasing (the rows sorted
  // longest first, which is the order of every [B, ...] array too), T is lengths[0], and tokens is
  // sum(lengths) = x's first dimension. Nothing is copied in or out; the window runs on the arrays as given.
  bool packed = false;

  // Outputs.
  TensorView y;      // [T, B, P] =  hidden state of every step
  TensorView h_T;    // [B, P]    =  final hidden state (equal to y[T-1]); optional
  TensorView c_T;    // [B, H]    =  final cell state, LSTM only, of cell_state_dtype(x), unrounded; optional
  TensorView cache;  // [T, B, cache_width * H] =  what backward() needs; absent for inference only
                     //   (with lengths, its first sum(lengths) rows of [B, cache_width * H] are written)
};

// Checks every input of `args` (x, W, R, bW, bR, h0, c0) as forward() does, ignoring the outputs, so that a
// caller can allocate outputs only for valid inputs. Throws ArgumentError or DTypeError.
void check_forward_inputs(const CellOptions& options, const ForwardArgs& args);

// Runs the cell over the T steps of the window, from h0 (and c0) to h_T (and c_T).
// `stream` is a cudaStream_t for CUDA views (nullptr: the default stream) and is ignored on the CPU.
void forward(const CellOptions& options, const ForwardArgs& args, void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Backward over a window

// The arrays of backward(): what forward read and wrote, the gradients of its outputs, and the gradients
// to compute.
struct BackwardArgs {
  // What forward() read and wrote (read only): the same views, unchanged since.
  TensorView x;      // [T, B, I]
  TensorView W;      // [G*H, I]
  TensorView R;      // [G*H, P]
  TensorView h0;     // [B, P]; absent if forward's was
  TensorView c0;     // [B, H]; LSTM only, of cell_state_dtype(x); absent if forward's was
  TensorView P;      // [3, H]; with peephole only
  TensorView W_hr;   // [P, H]; with a projection only
  TensorView gamma_x, gamma_h, gamma_c, beta_c;  // with layer_norm only, as forward's
  TensorView y;      // [T, B, P]
  TensorView cache;  // [T, B, cache_width * H]
  TensorView lengths;  // [B]; the very lengths forward() ran with (absent if it ran without)
  bool packed = false;  // as forward()'s: dy and dx are then packed as x is

  // Gradients of the loss with respect to forward's outputs (read only).
  TensorView dy;    // [T, B, P]; with lengths, read at each row's steps only
  TensorView dh_T;  // [B, P]; optional (absent: zeros, no loss on the final state)
  TensorView dc_T;  // [B, H]; LSTM only, of cell_state_dtype(x); optional (absent: zeros)

  // Gradients of the loss with respect to forward's inputs. Each is optional: absent means not wanted.
  TensorView dx;   // [T, B, I] =  (0 at the steps past a row's length)
  TensorView dh0;  // [B, P]    =
  TensorView dc0;  // [B, H]    =  LSTM only, of cell_state_dtype(x)
  TensorView dW;   // [G*H, I]  =, or += when accumulate
  TensorView dR;   // [G*H, P]  =, or += when accumulate
  TensorView dbW;  // [G*H]     =, or += when accumulate
  TensorView dbR;  // [G*H]     =, or += when accumulate
  TensorView dP;   // [3, H]    =, or += when accumulate; with peephole only (dp_i is 0 with coupled gates)
  TensorView dW_hr;  // [P, H]  =, or += when accumulate; with a projection only
  // [G*H], [G*H], [H], [H] =, or += when accumulate; with layer_norm only (the last two: the LSTM's)
  TensorView dgamma_x, dgamma_h, dgamma_c, dbeta_c;

  // false: parameter gradients are written (=). true: they are added to (+=), for summing over windows.
  bool accumulate = false;
};

// A BackwardArgs that holds what `forward_args` read and wrote (x, W, R, h0, c0, P, W_hr, the layer-norm gains,
// y, cache, lengths, packed), for the caller to complete with dy (and dh_T, dc_T) and the gradients it wants.
BackwardArgs backward_args_for(const ForwardArgs& forward_args);

// Checks every input of `args` (what forward read and wrote, dy, dh_T, dc_T) as backward() does, ignoring
// the gradient outputs. Throws ArgumentError or DTypeError.
void check_backward_inputs(const CellOptions& options, const BackwardArgs& args);

// Exact gradients for the window, by backpropagation through its T steps, from what forward() cached
// (nothing of the forward pass is recomputed).
void backward(const CellOptions& options, const BackwardArgs& args, void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Dropout masks

// Writes the inverted-dropout mask of docs/math.md into `out` [T, B, H] (any float dtype, CPU or CUDA; `stream` as
// for forward): out[t, b, u] = 0 with probability p, else 1 / (1 - p). The draw is a pure function of
// (seed, mask_stream, b, u, step) with step = t, or 0 for every t when variational, computed with integer
// arithmetic only: the CPU, the GPU and the NumPy reference give the same mask. 0 <= p < 1.
void dropout_mask(double p, bool variational, uint64_t seed, uint64_t mask_stream, const TensorView& out,
                  void* stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Backends

// Whether this library was compiled with the CUDA backend.
bool cuda_built();
// The number of CUDA devices usable now (0 when not built, no driver or no device). Never throws.
int cuda_device_count();
// Whether CUDA work can run now: the backend is built, a device is present, and a kernel of this build
// launches on device 0 and reproduces the host's cell math. Never throws.
bool cuda_available();

// The CPU worker pool's size (default: the hardware threads, or CONVEYOR_NUM_THREADS when set).
int num_threads();
// Resizes the CPU worker pool; 1 <= n <= 1024.
void set_num_threads(int n);
// With `share` true: the CPU backend runs its calls' parallel work on the threads of the GNU OpenMP runtime
// (libgomp) that another library of the process has loaded (PyTorch's CPU build does), num_threads() of
// them, instead of on its own pool. Another library's OpenMP threads wait spinning on a core for some
// milliseconds after each of its parallel regions, and a pool of Conveyor's own started right after shares
// that core with them; on the same threads, each runs in turn. A call that starts while the runtime's threads
// are asleep (Linux: their state in /proc) runs on the own pool instead, which does not wait for sleeping
// threads to wake. Returns whether the runtime was found (nothing changes where it was not). With `share`
// false: back to the own pool.
bool share_openmp_threads(bool share = true);
// Whether the CPU backend runs on a loaded OpenMP runtime's threads (share_openmp_threads).
bool sharing_openmp_threads();
// With `on` true (the default where the processor has them; CONVEYOR_CPU_AMX=0 in the environment turns it
// off): the CPU backend's float32 matrix products of at least 128 columns and a depth of 128 run on the
// processor's AMX tiles (Intel Xeon, Sapphire Rapids and later). Each float is split into three bfloat16
// parts whose sum is the float exactly, and the six largest of the nine part products are summed in float32:
// float32's accuracy (worst errors against float64 of the same order as the AVX-512 products'), at 1.1-1.6
// times their speed. The bits differ from the AVX-512 products'. Returns the previous setting; products
// begun after the call follow it. Where the processor has no AMX, nothing changes.
bool use_amx(bool on = true);
// Whether float32 products run on AMX tiles (use_amx).
bool using_amx();

// The library version, "major.minor.patch".
const char* version();

}  // namespace conveyor
