// Fused CPU kernels for GroupedConv4's channels_last activations (pipeline/models.py).
//
// Each block of the network is conv -> BatchNorm statistics -> 2x2 max-pool -> affine -> ReLU
// -> cast for the next conv. With stock ops that is a pass over a large activation per step,
// forward and backward (plus int64 argmax indices as large as a bfloat16 activation, a zero
// fill and a scalar scatter for the unpooling); on a 2-core CPU with bfloat16 convolutions,
// those passes, not the convolutions, were most of a meta-gradient. Here:
//
//   pool_stats_forward   one read of h -> pooled y, a uint8 window phase (0..3: which of the
//                        (0,0), (0,1), (1,0), (1,1) positions won), per-channel mean and var
//   pool_backward        one write of gx = unpool(gy) + c * h + offset (the statistics'
//                        gradient is c * h + offset per channel; c, offset optional)
//   pool_gather          y = x at each window's winner (the adjoint of the unpooling)
//   affine_relu_forward  out = relu(scale * p + shift) per channel, written in out's dtype
//                        (bfloat16 for the next convolution: no separate cast pass)
//   affine_relu_backward one read of the output gradient -> the input gradient and the
//                        per-channel gradients of scale and shift
//   affine_relu_double_backward  the derivatives of that backward (second-order MAML)
//   relayout             convolution weights [O, I, kh, kw] between contiguous and
//                        channels_last, cast on the way (a small transpose per output channel)
//   conv3x3_weight_grad  a grouped 3x3 convolution's weight gradient as one matrix product
//                        per group (its patches gathered first), for small images, where
//                        oneDNN's backward-weights kernel is mostly fixed cost
//   stem_run / stem_weight_grad
//                        the FIRST block's 3x3 convolution fused with its 2x2 max-pool, for
//                        few input channels (Omniglot: 1): the full-resolution convolution
//                        output, the largest activation of the network, is never written.
//                        Its BatchNorm statistics come from input patch moments instead
//                        (models._first_layer_stats); the input takes no gradient.
//
// The Python side (fused.py) wraps each in an autograd Function whose derivatives are the
// others, so every order of derivative (second-order MAML) stays on these kernels.
//
// Ties and NaNs resolve as in PyTorch's max_pool2d: the first maximum in row-major window
// order wins, a NaN always wins. Floor mode: a trailing odd row/column is not pooled but is
// counted in the statistics and gets its statistics' gradient.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

using torch::Tensor;

// Element access through raw storage types so that GCC vectorises the loops: bfloat16 as its
// uint16 bits (c10::BFloat16's own conversions do not vectorise), float and double as is.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };

inline float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }

template <typename R, typename V> inline R narrow(V v) { return static_cast<R>(v); }
template <> inline uint16_t narrow<uint16_t, float>(float f) {  // round to nearest even, as c10
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - static_cast<uint32_t>(f != f);  // all ones for NaN, as a mask
  return static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
}

template <typename scalar_t> const typename Raw<scalar_t>::type* raw(const Tensor& t) {
  return reinterpret_cast<const typename Raw<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t> typename Raw<scalar_t>::type* raw_mut(Tensor& t) {
  return reinterpret_cast<typename Raw<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

// Row kernels: plain loops over C contiguous channels, written to vectorise (no branches,
// no short-circuit logic, every load unconditional).

template <typename raw_t>
void accumulate_stats(const raw_t* __restrict__ in, int64_t C, double* __restrict__ sum,
                      double* __restrict__ sumsq) {
  for (int64_t c = 0; c < C; ++c) {
    const double v = widen(in[c]);
    sum[c] += v;
    sumsq[c] += v * v;
  }
}

template <typename raw_t>
void pool_window(const raw_t* __restrict__ w00, const raw_t* __restrict__ w01,
                 const raw_t* __restrict__ w10, const raw_t* __restrict__ w11, int64_t C,
                 raw_t* __restrict__ y, uint8_t* __restrict__ phase) {
  for (int64_t c = 0; c < C; ++c) {
    // the pooled value is the winner's raw bits (an input value, copied exactly)
    auto best = widen(w00[c]);
    raw_t out = w00[c];
    uint8_t p = 0;
    auto v = widen(w01[c]);
    bool take = (v > best) | (v != v);
    best = take ? v : best;
    out = take ? w01[c] : out;
    p = take ? 1 : p;
    v = widen(w10[c]);
    take = (v > best) | (v != v);
    best = take ? v : best;
    out = take ? w10[c] : out;
    p = take ? 2 : p;
    v = widen(w11[c]);
    take = (v > best) | (v != v);
    out = take ? w11[c] : out;
    p = take ? 3 : p;
    y[c] = out;
    phase[c] = p;
  }
}

// Backward of one window row: gy, phase [C] -> the 4 outputs' [C] (o00, o01, o10, o11).
template <typename raw_t>
void unpool_window(const raw_t* __restrict__ g, const uint8_t* __restrict__ phase, int64_t C,
                   raw_t* __restrict__ o00, raw_t* __restrict__ o01, raw_t* __restrict__ o10,
                   raw_t* __restrict__ o11) {
  for (int64_t c = 0; c < C; ++c) {
    const raw_t v = g[c], zero = 0;
    const uint8_t k = phase[c];
    o00[c] = k == 0 ? v : zero;
    o01[c] = k == 1 ? v : zero;
    o10[c] = k == 2 ? v : zero;
    o11[c] = k == 3 ? v : zero;
  }
}

// The same plus the statistics' gradient scale * h + offset at every position.
template <typename raw_t, typename opmath_t>
void unpool_affine_window(const raw_t* __restrict__ g, const uint8_t* __restrict__ phase,
                          const raw_t* __restrict__ h00, const raw_t* __restrict__ h01,
                          const raw_t* __restrict__ h10, const raw_t* __restrict__ h11,
                          const opmath_t* __restrict__ scale, const opmath_t* __restrict__ offset,
                          int64_t C, raw_t* __restrict__ o00, raw_t* __restrict__ o01,
                          raw_t* __restrict__ o10, raw_t* __restrict__ o11) {
  for (int64_t c = 0; c < C; ++c) {
    const opmath_t v = widen(g[c]), zero = 0, a = scale[c], b = offset[c];
    const uint8_t k = phase[c];
    o00[c] = narrow<raw_t>(a * widen(h00[c]) + b + (k == 0 ? v : zero));
    o01[c] = narrow<raw_t>(a * widen(h01[c]) + b + (k == 1 ? v : zero));
    o10[c] = narrow<raw_t>(a * widen(h10[c]) + b + (k == 2 ? v : zero));
    o11[c] = narrow<raw_t>(a * widen(h11[c]) + b + (k == 3 ? v : zero));
  }
}

// A position outside every window (odd trailing row or column): statistics' gradient or 0.
template <typename raw_t, typename opmath_t>
void unpooled_position(const raw_t* __restrict__ h, const opmath_t* __restrict__ scale,
                       const opmath_t* __restrict__ offset, int64_t C, raw_t* __restrict__ o) {
  for (int64_t c = 0; c < C; ++c) {
    o[c] = h ? narrow<raw_t>(scale[c] * widen(h[c]) + offset[c]) : raw_t(0);
  }
}

template <typename raw_t>
void gather_window(const raw_t* __restrict__ w00, const raw_t* __restrict__ w01,
                   const raw_t* __restrict__ w10, const raw_t* __restrict__ w11,
                   const uint8_t* __restrict__ phase, int64_t C, raw_t* __restrict__ y) {
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t k = phase[c];
    const raw_t a0 = w00[c], a1 = w01[c], b0 = w10[c], b1 = w11[c];
    const raw_t a = (k & 1) ? a1 : a0;
    const raw_t b = (k & 1) ? b1 : b0;
    y[c] = (k & 2) ? b : a;
  }
}

// One position of the statistics' gradient term c * h + offset, differentiated: for the
// incoming gradient g, gh = c * g (written when kGh), gc += g * h, goffset += g.
template <bool kGh, typename raw_t, typename opmath_t>
void stats_grad_row(const raw_t* __restrict__ g, const raw_t* __restrict__ h,
                    const opmath_t* __restrict__ c, int64_t C, raw_t* __restrict__ gh,
                    opmath_t* __restrict__ gc, opmath_t* __restrict__ goffset) {
  for (int64_t k = 0; k < C; ++k) {
    const opmath_t v = widen(g[k]);
    if constexpr (kGh) gh[k] = narrow<raw_t>(c[k] * v);
    gc[k] += v * widen(h[k]);
    goffset[k] += v;
  }
}

template <typename in_t, typename out_t, typename opmath_t>
void affine_relu_row(const in_t* __restrict__ p, const opmath_t* __restrict__ scale,
                     const opmath_t* __restrict__ shift, int64_t C, out_t* __restrict__ out) {
  for (int64_t c = 0; c < C; ++c) {
    const opmath_t v = scale[c] * widen(p[c]) + shift[c];
    out[c] = narrow<out_t>(v > opmath_t(0) ? v : opmath_t(0));
  }
}

// The per-channel sums of these two rows go into opmath_t partials (GCC does not vectorise a
// select feeding a double accumulator); `BlockSums` moves them into double totals.
template <typename in_t, typename out_t, typename opmath_t>
void affine_relu_grad_row(const out_t* __restrict__ g, const out_t* __restrict__ out,
                          const in_t* __restrict__ p, const opmath_t* __restrict__ scale,
                          int64_t C, in_t* __restrict__ gp, opmath_t* __restrict__ gscale,
                          opmath_t* __restrict__ gshift) {
  for (int64_t c = 0; c < C; ++c) {
    const opmath_t live = widen(out[c]) > opmath_t(0) ? widen(g[c]) : opmath_t(0);
    gp[c] = narrow<in_t>(live * scale[c]);
    gscale[c] += live * widen(p[c]);
    gshift[c] += live;
  }
}

// Derivatives of affine_relu_grad_row's outputs (gp, gscale, gshift) given their gradients
// (ggp, ggscale, ggshift); the mask out > 0 is piecewise constant.
template <typename in_t, typename out_t, typename opmath_t>
void affine_relu_grad_grad_row(const out_t* __restrict__ g, const out_t* __restrict__ out,
                               const in_t* __restrict__ p, const in_t* __restrict__ ggp,
                               const opmath_t* __restrict__ scale,
                               const opmath_t* __restrict__ ggscale,
                               const opmath_t* __restrict__ ggshift, int64_t C,
                               out_t* __restrict__ dg, in_t* __restrict__ dp,
                               opmath_t* __restrict__ dscale) {
  for (int64_t c = 0; c < C; ++c) {
    const bool live = widen(out[c]) > opmath_t(0);
    const opmath_t gv = widen(g[c]), pv = widen(p[c]), qv = widen(ggp[c]), zero = 0;
    const opmath_t a = scale[c] * qv + ggscale[c] * pv + ggshift[c];
    dg[c] = narrow<out_t>(live ? a : zero);
    dp[c] = narrow<in_t>(live ? ggscale[c] * gv : zero);
    dscale[c] += live ? qv * gv : zero;
  }
}

// Stem: for one pooling window and one task, nb[k][a] is input patch entry k (k = ci*9 +
// dy*3 + dx, the conv weight order) under window position a (0..3: (0,0), (0,1), (1,0),
// (1,1)); w is [K][C] (channel-contiguous). v[a][c] = sum_k w[k][c] * nb[k][a].
template <typename opmath_t>
void stem_window_conv(const opmath_t* nb, const opmath_t* __restrict__ w, int64_t K, int64_t C,
                      opmath_t* __restrict__ v0, opmath_t* __restrict__ v1,
                      opmath_t* __restrict__ v2, opmath_t* __restrict__ v3) {
  // Blocks of B channels: the four accumulators stay in registers across the K terms.
  constexpr int64_t B = 16;
  int64_t c0 = 0;
  for (; c0 + B <= C; c0 += B) {
    opmath_t a0[B] = {}, a1[B] = {}, a2[B] = {}, a3[B] = {};
    for (int64_t k = 0; k < K; ++k) {
      const opmath_t p0 = nb[4 * k], p1 = nb[4 * k + 1], p2 = nb[4 * k + 2], p3 = nb[4 * k + 3];
      const opmath_t* __restrict__ wk = w + k * C + c0;
      for (int64_t c = 0; c < B; ++c) {
        a0[c] += wk[c] * p0;
        a1[c] += wk[c] * p1;
        a2[c] += wk[c] * p2;
        a3[c] += wk[c] * p3;
      }
    }
    for (int64_t c = 0; c < B; ++c) {
      v0[c0 + c] = a0[c];
      v1[c0 + c] = a1[c];
      v2[c0 + c] = a2[c];
      v3[c0 + c] = a3[c];
    }
  }
  for (int64_t c = c0; c < C; ++c) {  // the remainder, channel by channel
    opmath_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t k = 0; k < K; ++k) {
      const opmath_t wk = w[k * C + c];
      a0 += wk * nb[4 * k];
      a1 += wk * nb[4 * k + 1];
      a2 += wk * nb[4 * k + 2];
      a3 += wk * nb[4 * k + 3];
    }
    v0[c] = a0;
    v1[c] = a1;
    v2[c] = a2;
    v3[c] = a3;
  }
}

// The value a convolution written in raw_t would hold (bfloat16: rounded), as opmath.
template <typename raw_t, typename opmath_t> inline opmath_t as_stored(opmath_t v) {
  return widen(narrow<raw_t>(v));
}

template <typename raw_t, typename opmath_t>
void stem_pool_row(const opmath_t* __restrict__ v0, const opmath_t* __restrict__ v1,
                   const opmath_t* __restrict__ v2, const opmath_t* __restrict__ v3, int64_t C,
                   raw_t* __restrict__ y, uint8_t* __restrict__ phase) {
  for (int64_t c = 0; c < C; ++c) {
    opmath_t best = as_stored<raw_t>(v0[c]);
    uint8_t p = 0;
    opmath_t v = as_stored<raw_t>(v1[c]);
    bool take = (v > best) | (v != v);
    best = take ? v : best;
    p = take ? 1 : p;
    v = as_stored<raw_t>(v2[c]);
    take = (v > best) | (v != v);
    best = take ? v : best;
    p = take ? 2 : p;
    v = as_stored<raw_t>(v3[c]);
    take = (v > best) | (v != v);
    best = take ? v : best;
    p = take ? 3 : p;
    y[c] = narrow<raw_t>(best);
    phase[c] = p;
  }
}

template <typename raw_t, typename opmath_t>
void stem_select_row(const opmath_t* __restrict__ v0, const opmath_t* __restrict__ v1,
                     const opmath_t* __restrict__ v2, const opmath_t* __restrict__ v3,
                     const uint8_t* __restrict__ phase, int64_t C, raw_t* __restrict__ y) {
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t k = phase[c];
    const opmath_t a = (k & 1) ? v1[c] : v0[c];
    const opmath_t b = (k & 1) ? v3[c] : v2[c];
    y[c] = narrow<raw_t>((k & 2) ? b : a);
  }
}

// acc[k][c] += g[c] * nb[k][phase[c]] summed over the Wo windows of one pooled row of one
// task: each block of 16 channels and 9 patch entries sums in registers across the row, and
// the task's accumulator acc [K][C] (in L2) is touched once per row instead of once per
// window (2.19 -> 1.83 ms for 32 tasks).
// gs: the row's gradient split by winner, [Wo][4][C] (stem_split_window); nbs: the windows'
// patches, [Wo][4 * K].
template <typename opmath_t>
void stem_grad_row(const opmath_t* __restrict__ gs, const opmath_t* __restrict__ nbs, int64_t Wo,
                   int64_t K, int64_t C, opmath_t* __restrict__ acc) {
  constexpr int64_t B = 16, KB = 9;
  int64_t c0 = 0;
  for (; c0 + B <= C; c0 += B) {
    for (int64_t k0 = 0; k0 < K; k0 += KB) {  // K = 9 * C_in
      opmath_t a[KB][B] = {};
      for (int64_t j = 0; j < Wo; ++j) {
        const opmath_t* m = gs + j * 4 * C + c0;
        const opmath_t* nb = nbs + j * 4 * K + 4 * k0;
#pragma GCC unroll 9
        for (int64_t k = 0; k < KB; ++k) {
          const opmath_t p0 = nb[4 * k], p1 = nb[4 * k + 1], p2 = nb[4 * k + 2],
                         p3 = nb[4 * k + 3];
          for (int64_t c = 0; c < B; ++c) {
            a[k][c] += m[c] * p0 + m[C + c] * p1 + m[2 * C + c] * p2 + m[3 * C + c] * p3;
          }
        }
      }
      for (int64_t k = 0; k < KB; ++k) {
        opmath_t* out = acc + (k0 + k) * C + c0;
        for (int64_t c = 0; c < B; ++c) out[c] += a[k][c];
      }
    }
  }
  for (int64_t c = c0; c < C; ++c) {  // the remainder, channel by channel
    for (int64_t j = 0; j < Wo; ++j) {
      const opmath_t* m = gs + j * 4 * C + c;
      const opmath_t* nb = nbs + j * 4 * K;
      for (int64_t k = 0; k < K; ++k) {
        acc[k * C + c] += m[0] * nb[4 * k] + m[C] * nb[4 * k + 1] + m[2 * C] * nb[4 * k + 2] +
                          m[3 * C] * nb[4 * k + 3];
      }
    }
  }
}

// One window's gradient g [C] split by winner: o[a][c] = g[c] if phase[c] == a, else 0.
template <typename raw_t, typename opmath_t>
void stem_split_window(const raw_t* __restrict__ g, const uint8_t* __restrict__ phase, int64_t C,
                       opmath_t* __restrict__ o0, opmath_t* __restrict__ o1,
                       opmath_t* __restrict__ o2, opmath_t* __restrict__ o3) {
  for (int64_t c = 0; c < C; ++c) {
    const opmath_t v = widen(g[c]), zero = 0;
    const uint8_t k = phase[c];
    o0[c] = k == 0 ? v : zero;
    o1[c] = k == 1 ? v : zero;
    o2[c] = k == 2 ? v : zero;
    o3[c] = k == 3 ? v : zero;
  }
}

// Per-thread partial sums of `width` values for a parallel_for, then their totals.
template <typename T>
class ThreadSums {
 public:
  explicit ThreadSums(int64_t width)
      : width_(width), threads_(at::get_num_threads()),
        acc_(static_cast<size_t>(threads_) * width, T(0)) {}
  T* mine() { return acc_.data() + static_cast<size_t>(at::get_thread_num()) * width_; }
  T total(int64_t e) const {
    T sum = 0;
    for (int k = 0; k < threads_; ++k) sum += acc_[static_cast<size_t>(k) * width_ + e];
    return sum;
  }
  // Totals from .. from + count - 1 as a new 1-d tensor of out_t (a per-channel result).
  template <typename out_t>
  Tensor totals(int64_t from, int64_t count, const at::TensorOptions& options) const {
    Tensor out = at::empty({count}, options.dtype(c10::CppTypeToScalarType<out_t>::value));
    out_t* p = out.data_ptr<out_t>();
    for (int64_t e = 0; e < count; ++e) p[e] = static_cast<out_t>(total(from + e));
    return out;
  }

 private:
  int64_t width_;
  int threads_;
  std::vector<T> acc_;
};

// Per-channel sums over many rows for one thread: rows add into opmath_t `partial()` (which
// vectorises), and every kRows rows `row_done` moves the partials into the thread's double
// totals, so float rounding spans at most kRows terms.
template <typename opmath_t>
class BlockSums {
 public:
  static constexpr int64_t kRows = 64;
  BlockSums(ThreadSums<double>& sums, int64_t width)
      : total_(sums.mine()), partial_(static_cast<size_t>(width), opmath_t(0)) {}
  ~BlockSums() { flush(); }
  opmath_t* partial() { return partial_.data(); }
  void row_done() {
    if (++rows_ == kRows) flush();
  }

 private:
  void flush() {
    for (size_t e = 0; e < partial_.size(); ++e) {
      total_[e] += static_cast<double>(partial_[e]);
      partial_[e] = opmath_t(0);
    }
    rows_ = 0;
  }
  double* total_;
  std::vector<opmath_t> partial_;
  int64_t rows_ = 0;
};

void check_cl(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              name, " must be a 4-d channels_last tensor");
}

Tensor empty_cl(at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::empty(shape, options.memory_format(at::MemoryFormat::ChannelsLast));
}

std::vector<Tensor> pool_stats_forward(const Tensor& h, bool stats) {
  check_cl(h, "h");
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, R = (H + 1) / 2;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "pool_stats_forward: needs an input of at least 2x2");
  Tensor y = empty_cl({N, C, Ho, Wo}, h.options());
  Tensor phase = empty_cl({N, C, Ho, Wo}, h.options().dtype(at::kByte));
  Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "pool_stats_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using raw_t = typename Raw<scalar_t>::type;
    const raw_t* hp = raw<scalar_t>(h);
    raw_t* yp = raw_mut<scalar_t>(y);
    uint8_t* pp = phase.data_ptr<uint8_t>();
    ThreadSums<double> sums(stats ? 2 * C : 0);  // sum, sum of squares
    // one work item: image n, input rows 2r and 2r + 1 (pooled into output row r if r < Ho)
    at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
      double* sum = stats ? sums.mine() : nullptr;
      double* sumsq = stats ? sum + C : nullptr;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / R, r = item % R;
        const raw_t* row0 = hp + (n * H + 2 * r) * W * C;
        const raw_t* row1 = row0 + W * C;
        if (stats) {
          const int64_t count = (2 * r + 1 < H ? 2 : 1) * W * C;
          for (int64_t k = 0; k < count; k += C) accumulate_stats(row0 + k, C, sum, sumsq);
        }
        if (r >= Ho) continue;
        raw_t* yrow = yp + (n * Ho + r) * Wo * C;
        uint8_t* prow = pp + (n * Ho + r) * Wo * C;
        for (int64_t j = 0; j < Wo; ++j) {
          const raw_t* w00 = row0 + 2 * j * C;
          const raw_t* w10 = row1 + 2 * j * C;
          pool_window(w00, w00 + C, w10, w10 + C, C, yrow + j * C, prow + j * C);
        }
      }
    });
    if (stats) {
      const auto stat_dtype = c10::CppTypeToScalarType<opmath_t>::value;
      mean = at::empty({C}, h.options().dtype(stat_dtype));
      var = at::empty({C}, h.options().dtype(stat_dtype));
      opmath_t* mp = mean.data_ptr<opmath_t>();
      opmath_t* vp = var.data_ptr<opmath_t>();
      const double count = static_cast<double>(N * H * W);
      for (int64_t c = 0; c < C; ++c) {
        const double m = sums.total(c) / count;
        mp[c] = static_cast<opmath_t>(m);
        vp[c] = static_cast<opmath_t>(std::max(sums.total(C + c) / count - m * m, 0.0));
      }
    }
  });
  if (!stats) return {y, phase};
  return {y, phase, mean, var};
}

// gx [N, C, H, W] = unpool(gy, phase) + c * h + offset; h, c, offset undefined: unpool only.
Tensor pool_backward(const Tensor& gy, const Tensor& phase, int64_t H, int64_t W,
                     const c10::optional<Tensor>& h_opt, const c10::optional<Tensor>& c_opt,
                     const c10::optional<Tensor>& offset_opt) {
  check_cl(gy, "gy");
  check_cl(phase, "phase");
  const bool affine = h_opt.has_value() && h_opt->defined();
  const int64_t N = gy.size(0), C = gy.size(1), Ho = gy.size(2), Wo = gy.size(3);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "pool_backward: needs an input of at least 2x2");
  TORCH_CHECK(Ho == H / 2 && Wo == W / 2, "pool_backward: gy does not pool an HxW input");
  Tensor gx = empty_cl({N, C, H, W}, gy.options());
  Tensor h, c_t, off_t;
  if (affine) {
    h = *h_opt;
    check_cl(h, "h");
    TORCH_CHECK(h.scalar_type() == gy.scalar_type(), "pool_backward: h and gy dtypes differ");
  }
  const int64_t R = (H + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gy.scalar_type(), "pool_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto stat_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    if (affine) {
      c_t = c_opt->to(stat_dtype).contiguous();
      off_t = offset_opt->to(stat_dtype).contiguous();
      TORCH_CHECK(c_t.numel() == C && off_t.numel() == C, "pool_backward: c, offset must be [C]");
    }
    using raw_t = typename Raw<scalar_t>::type;
    const raw_t* gp = raw<scalar_t>(gy);
    const uint8_t* pp = phase.const_data_ptr<uint8_t>();
    const raw_t* hp = affine ? raw<scalar_t>(h) : nullptr;
    const opmath_t* cp = affine ? c_t.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* op = affine ? off_t.const_data_ptr<opmath_t>() : nullptr;
    raw_t* xp = raw_mut<scalar_t>(gx);
    at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / R, r = item % R;
        const int64_t row0 = (n * H + 2 * r) * W * C, row1 = row0 + W * C;
        const auto leftover = [&](int64_t at) {
          unpooled_position(affine ? hp + at : nullptr, cp, op, C, xp + at);
        };
        if (r == Ho) {  // odd H: the last row is in no window
          for (int64_t x = 0; x < W; ++x) leftover(row0 + x * C);
          continue;
        }
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t win = ((n * Ho + r) * Wo + j) * C;
          const int64_t a = row0 + 2 * j * C, b = row1 + 2 * j * C;
          if (affine) {
            unpool_affine_window(gp + win, pp + win, hp + a, hp + a + C, hp + b, hp + b + C, cp,
                                 op, C, xp + a, xp + a + C, xp + b, xp + b + C);
          } else {
            unpool_window(gp + win, pp + win, C, xp + a, xp + a + C, xp + b, xp + b + C);
          }
        }
        if (W % 2) {  // odd W: the last column is in no window
          leftover(row0 + (W - 1) * C);
          leftover(row1 + (W - 1) * C);
        }
      }
    });
  });
  return gx;
}

// y [N, C, H/2, W/2] = x at each window's winner.
Tensor pool_gather(const Tensor& x, const Tensor& phase) {
  check_cl(x, "x");
  check_cl(phase, "phase");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = phase.size(2), Wo = phase.size(3);
  TORCH_CHECK(Ho == H / 2 && Wo == W / 2 && phase.size(1) == C, "pool_gather: shapes differ");
  Tensor y = empty_cl({N, C, Ho, Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pool_gather", [&] {
    using raw_t = typename Raw<scalar_t>::type;
    const raw_t* xp = raw<scalar_t>(x);
    const uint8_t* pp = phase.const_data_ptr<uint8_t>();
    raw_t* yp = raw_mut<scalar_t>(y);
    at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / Ho, r = item % Ho;
        const raw_t* row0 = xp + (n * H + 2 * r) * W * C;
        const raw_t* row1 = row0 + W * C;
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t at = ((n * Ho + r) * Wo + j) * C;
          const raw_t* w00 = row0 + 2 * j * C;
          const raw_t* w10 = row1 + 2 * j * C;
          gather_window(w00, w00 + C, w10, w10 + C, pp + at, C, yp + at);
        }
      }
    });
  });
  return y;
}

// The derivatives of pool_backward's gx = unpool(gy) + c * h + offset for the incoming
// gradient ggx, in one pass over ggx: ggy = ggx at each window's winner (if want_ggy), gh =
// c * ggx (if want_gh), gc = sum of ggx * h and goffset = sum of ggx per channel (opmath).
std::vector<Tensor> pool_backward_backward(const Tensor& ggx_in, const Tensor& phase,
                                           const Tensor& h, const Tensor& c, bool want_ggy,
                                           bool want_gh) {
  const Tensor ggx = ggx_in.contiguous(at::MemoryFormat::ChannelsLast);
  check_cl(phase, "phase");
  check_cl(h, "h");
  TORCH_CHECK(ggx.scalar_type() == h.scalar_type() && ggx.sizes() == h.sizes(),
              "pool_backward_backward: ggx and h differ in dtype or shape");
  const int64_t N = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
  const int64_t Ho = phase.size(2), Wo = phase.size(3), R = (H + 1) / 2;
  TORCH_CHECK(Ho == H / 2 && Wo == W / 2 && phase.size(1) == C,
              "pool_backward_backward: phase does not pool h");
  Tensor ggy = want_ggy ? empty_cl({N, C, Ho, Wo}, h.options()) : Tensor();
  Tensor gh = want_gh ? empty_cl({N, C, H, W}, h.options()) : Tensor();
  Tensor gc, goffset;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "pool_backward_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using raw_t = typename Raw<scalar_t>::type;
    const auto stat_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    const Tensor c_t = c.to(stat_dtype).contiguous();
    TORCH_CHECK(c_t.numel() == C, "pool_backward_backward: c must be [C]");
    const opmath_t* cp = c_t.const_data_ptr<opmath_t>();
    const raw_t* gp = raw<scalar_t>(ggx);
    const raw_t* hp = raw<scalar_t>(h);
    const uint8_t* pp = phase.const_data_ptr<uint8_t>();
    raw_t* yp = want_ggy ? raw_mut<scalar_t>(ggy) : nullptr;
    raw_t* ghp = want_gh ? raw_mut<scalar_t>(gh) : nullptr;
    ThreadSums<double> sums(2 * C);  // gc, goffset
    at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
      BlockSums<opmath_t> block(sums, 2 * C);
      opmath_t* part = block.partial();
      const auto position = [&](int64_t at) {
        if (want_gh) {
          stats_grad_row<true>(gp + at, hp + at, cp, C, ghp + at, part, part + C);
        } else {
          stats_grad_row<false>(gp + at, hp + at, cp, C, ghp, part, part + C);
        }
        block.row_done();
      };
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / R, r = item % R;
        const int64_t row0 = (n * H + 2 * r) * W * C;
        const int64_t rows = 2 * r + 1 < H ? 2 : 1;
        for (int64_t k = 0; k < rows * W; ++k) position(row0 + k * C);
        if (!want_ggy || r >= Ho) continue;
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t at = ((n * Ho + r) * Wo + j) * C;
          const raw_t* w00 = gp + row0 + 2 * j * C;
          const raw_t* w10 = w00 + W * C;
          gather_window(w00, w00 + C, w10, w10 + C, pp + at, C, yp + at);
        }
      }
    });
    gc = sums.totals<opmath_t>(0, C, h.options());
    goffset = sums.totals<opmath_t>(C, C, h.options());
  });
  return {ggy, gh, gc, goffset};
}

// Dispatch on (p dtype, out dtype): (bf16, bf16), (bf16, f32), (f32, f32), (f64, f64).
template <typename F>
void dispatch_pair(at::ScalarType in, at::ScalarType out, const char* name, F&& body) {
  if (in == at::kBFloat16 && out == at::kBFloat16) {
    body(uint16_t{}, uint16_t{}, float{});
  } else if (in == at::kBFloat16 && out == at::kFloat) {
    body(uint16_t{}, float{}, float{});
  } else if (in == at::kFloat && out == at::kFloat) {
    body(float{}, float{}, float{});
  } else if (in == at::kDouble && out == at::kDouble) {
    body(double{}, double{}, double{});
  } else {
    TORCH_CHECK(false, name, ": unsupported dtypes ", in, " -> ", out);
  }
}

Tensor affine_relu_forward(const Tensor& p, const Tensor& scale, const Tensor& shift,
                           at::ScalarType out_dtype) {
  check_cl(p, "p");
  const int64_t N = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3);
  Tensor out = empty_cl({N, C, H, W}, p.options().dtype(out_dtype));
  dispatch_pair(p.scalar_type(), out_dtype, "affine_relu_forward", [&](auto in_v, auto out_v, auto op_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    using opmath_t = decltype(op_v);
    const Tensor sc = scale.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    const Tensor sh = shift.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    TORCH_CHECK(sc.numel() == C && sh.numel() == C, "affine_relu_forward: scale, shift must be [C]");
    const in_t* pp = static_cast<const in_t*>(p.const_data_ptr());
    out_t* op = static_cast<out_t*>(out.data_ptr());
    const opmath_t* scp = sc.const_data_ptr<opmath_t>();
    const opmath_t* shp = sh.const_data_ptr<opmath_t>();
    at::parallel_for(0, N * H * W, 16, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end; ++pos) affine_relu_row(pp + pos * C, scp, shp, C, op + pos * C);
    });
  });
  return out;
}

// (gp, gscale, gshift) for out = relu(scale * p + shift), given the gradient g of out.
std::vector<Tensor> affine_relu_backward(const Tensor& g, const Tensor& out, const Tensor& p,
                                         const Tensor& scale) {
  check_cl(out, "out");
  check_cl(p, "p");
  const Tensor gc = g.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(gc.scalar_type() == out.scalar_type(), "affine_relu_backward: g and out dtypes differ");
  const int64_t N = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3);
  Tensor gp = empty_cl({N, C, H, W}, p.options());
  Tensor gscale, gshift;
  dispatch_pair(p.scalar_type(), out.scalar_type(), "affine_relu_backward", [&](auto in_v, auto out_v, auto op_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    using opmath_t = decltype(op_v);
    const auto stat_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    const Tensor sc = scale.to(stat_dtype).contiguous();
    TORCH_CHECK(sc.numel() == C, "affine_relu_backward: scale must be [C]");
    const out_t* gptr = static_cast<const out_t*>(gc.const_data_ptr());
    const out_t* optr = static_cast<const out_t*>(out.const_data_ptr());
    const in_t* pptr = static_cast<const in_t*>(p.const_data_ptr());
    in_t* gpp = static_cast<in_t*>(gp.data_ptr());
    const opmath_t* scp = sc.const_data_ptr<opmath_t>();
    ThreadSums<double> sums(2 * C);  // gscale, gshift
    at::parallel_for(0, N * H * W, 16, [&](int64_t begin, int64_t end) {
      BlockSums<opmath_t> block(sums, 2 * C);
      opmath_t* gs = block.partial();
      for (int64_t pos = begin; pos < end; ++pos, block.row_done()) {
        const int64_t at = pos * C;
        affine_relu_grad_row(gptr + at, optr + at, pptr + at, scp, C, gpp + at, gs, gs + C);
      }
    });
    gscale = sums.totals<opmath_t>(0, C, p.options());
    gshift = sums.totals<opmath_t>(C, C, p.options());
  });
  return {gp, gscale, gshift};
}

// (dg, dp, dscale): the derivatives of affine_relu_backward's outputs, for MAML's second order.
std::vector<Tensor> affine_relu_double_backward(const Tensor& g, const Tensor& out,
                                                const Tensor& p, const Tensor& scale,
                                                const Tensor& ggp, const Tensor& ggscale,
                                                const Tensor& ggshift) {
  check_cl(out, "out");
  check_cl(p, "p");
  const Tensor gc = g.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor qc = ggp.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(gc.scalar_type() == out.scalar_type() && qc.scalar_type() == p.scalar_type(),
              "affine_relu_double_backward: dtypes differ");
  const int64_t N = p.size(0), C = p.size(1), H = p.size(2), W = p.size(3);
  Tensor dg = empty_cl({N, C, H, W}, out.options());
  Tensor dp = empty_cl({N, C, H, W}, p.options());
  Tensor dscale;
  dispatch_pair(p.scalar_type(), out.scalar_type(), "affine_relu_double_backward", [&](auto in_v, auto out_v, auto op_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    using opmath_t = decltype(op_v);
    const auto stat_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    const Tensor sc = scale.to(stat_dtype).contiguous();
    const Tensor gs = ggscale.to(stat_dtype).contiguous();
    const Tensor gh = ggshift.to(stat_dtype).contiguous();
    TORCH_CHECK(sc.numel() == C && gs.numel() == C && gh.numel() == C,
                "affine_relu_double_backward: per-channel tensors must be [C]");
    const out_t* gptr = static_cast<const out_t*>(gc.const_data_ptr());
    const out_t* optr = static_cast<const out_t*>(out.const_data_ptr());
    const in_t* pptr = static_cast<const in_t*>(p.const_data_ptr());
    const in_t* qptr = static_cast<const in_t*>(qc.const_data_ptr());
    out_t* dgp = static_cast<out_t*>(dg.data_ptr());
    in_t* dpp = static_cast<in_t*>(dp.data_ptr());
    const opmath_t* scp = sc.const_data_ptr<opmath_t>();
    const opmath_t* gsp = gs.const_data_ptr<opmath_t>();
    const opmath_t* ghp = gh.const_data_ptr<opmath_t>();
    ThreadSums<double> sums(C);
    at::parallel_for(0, N * H * W, 16, [&](int64_t begin, int64_t end) {
      BlockSums<opmath_t> block(sums, C);
      opmath_t* ds = block.partial();
      for (int64_t pos = begin; pos < end; ++pos, block.row_done()) {
        const int64_t at = pos * C;
        affine_relu_grad_grad_row(gptr + at, optr + at, pptr + at, qptr + at, scp, gsp, ghp, C,
                                  dgp + at, dpp + at, ds);
      }
    });
    dscale = sums.totals<opmath_t>(0, C, p.options());
  });
  return {dg, dp, dscale};
}

Tensor relayout(const Tensor& x, at::ScalarType dtype, bool to_channels_last) {
  TORCH_CHECK(x.dim() == 4, "relayout: x must be 4-d");
  const auto from = to_channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const Tensor src = x.contiguous(from);
  const int64_t O = x.size(0), I = x.size(1), S = x.size(2) * x.size(3);
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype).memory_format(
      to_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  auto run = [&](auto in_v, auto out_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    const in_t* sp = static_cast<const in_t*>(src.const_data_ptr());
    out_t* dp = static_cast<out_t*>(out.data_ptr());
    // contiguous: [O][I][S]; channels_last: [O][S][I]
    at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const in_t* a = sp + o * I * S;
        out_t* b = dp + o * I * S;
        if (to_channels_last) {  // inner loop along the written (contiguous) dimension
          for (int64_t k = 0; k < S; ++k) {
            for (int64_t i = 0; i < I; ++i) b[k * I + i] = narrow<out_t>(widen(a[i * S + k]));
          }
        } else {  // inner loop along the read dimension: strided stores beat strided loads
          for (int64_t k = 0; k < S; ++k) {
            for (int64_t i = 0; i < I; ++i) b[i * S + k] = narrow<out_t>(widen(a[k * I + i]));
          }
        }
      }
    });
  };
  const auto in = x.scalar_type();
  if (in == at::kFloat && dtype == at::kBFloat16) {
    run(float{}, uint16_t{});
  } else if (in == at::kBFloat16 && dtype == at::kFloat) {
    run(uint16_t{}, float{});
  } else if (in == at::kFloat && dtype == at::kFloat) {
    run(float{}, float{});
  } else if (in == at::kDouble && dtype == at::kDouble) {
    run(double{}, double{});
  } else {
    TORCH_CHECK(false, "relayout: unsupported dtypes ", in, " -> ", dtype);
  }
  return out;
}

// Input patches of one pooling window (i, j), task t: nb[k][a]. x is zero padded by one
// pixel on every side ([N, H+2, W+2, T*C_in]), so there are no bounds to check.
template <typename raw_t, typename opmath_t>
void stem_patches(const raw_t* x, int64_t Hp, int64_t Wp, int64_t TCi, int64_t Ci, int64_t n,
                  int64_t t, int64_t i, int64_t j, opmath_t* nb) {
  for (int64_t ci = 0; ci < Ci; ++ci) {
    // the 4x4 neighbourhood shared by the window's four 3x3 patches
    opmath_t v[4][4];
    for (int64_t r = 0; r < 4; ++r) {
      const raw_t* row = x + ((n * Hp + 2 * i + r) * Wp + 2 * j) * TCi + t * Ci + ci;
      for (int64_t q = 0; q < 4; ++q) v[r][q] = widen(row[q * TCi]);
    }
    for (int64_t dy = 0; dy < 3; ++dy) {
      for (int64_t dx = 0; dx < 3; ++dx) {
        opmath_t* out = nb + 4 * (ci * 9 + dy * 3 + dx);
        out[0] = v[dy][dx];
        out[1] = v[dy][dx + 1];
        out[2] = v[dy + 1][dx];
        out[3] = v[dy + 1][dx + 1];
      }
    }
  }
}

struct StemShape {
  int64_t N, H, W, T, Ci, C, K, Ho, Wo;
};

StemShape stem_shape(const Tensor& x, const Tensor& w, int64_t tasks) {
  check_cl(x, "x");
  TORCH_CHECK(w.dim() == 3 && w.size(0) == tasks && w.is_contiguous(),
              "stem: w must be a contiguous [T, C_in*9, C] tensor");
  // x is padded: H, W are the unpadded sides
  const int64_t H = x.size(2) - 2, W = x.size(3) - 2;
  StemShape s{x.size(0), H, W, tasks, x.size(1) / tasks, w.size(2), w.size(1), H / 2, W / 2};
  TORCH_CHECK(s.Ci * tasks == x.size(1) && s.K == s.Ci * 9 && s.Ho >= 1 && s.Wo >= 1,
              "stem: shapes do not match");
  return s;
}

// mode 0: (pooled, phase) = max over each window of conv(x, w); mode 1: y = conv(x, w) at
// the given phase, not rounded (the adjoint of stem_weight_grad).
std::vector<Tensor> stem_run(const Tensor& x, const Tensor& w, int64_t tasks,
                             const c10::optional<Tensor>& given_phase, at::ScalarType out_dtype) {
  const StemShape s = stem_shape(x, w, tasks);
  const bool select = given_phase.has_value();
  Tensor y = empty_cl({s.N, s.T * s.C, s.Ho, s.Wo}, x.options().dtype(out_dtype));
  Tensor phase = select ? given_phase->contiguous(at::MemoryFormat::ChannelsLast)
                        : empty_cl({s.N, s.T * s.C, s.Ho, s.Wo}, x.options().dtype(at::kByte));
  dispatch_pair(x.scalar_type(), out_dtype, "stem", [&](auto in_v, auto out_v, auto op_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    using opmath_t = decltype(op_v);
    TORCH_CHECK(w.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value,
                "stem: w must be in the compute dtype");
    const in_t* xp = static_cast<const in_t*>(x.const_data_ptr());
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    out_t* yp = static_cast<out_t*>(y.data_ptr());
    uint8_t* pp = phase.data_ptr<uint8_t>();
    at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> nb(4 * s.K), v(4 * s.C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / s.Ho, i = item % s.Ho;
        for (int64_t j = 0; j < s.Wo; ++j) {
          for (int64_t t = 0; t < s.T; ++t) {
            stem_patches<in_t, opmath_t>(xp, s.H + 2, s.W + 2, s.T * s.Ci, s.Ci, n, t, i, j,
                                         nb.data());
            opmath_t* v0 = v.data();
            stem_window_conv(nb.data(), wp + t * s.K * s.C, s.K, s.C, v0, v0 + s.C,
                             v0 + 2 * s.C, v0 + 3 * s.C);
            const int64_t at = ((n * s.Ho + i) * s.Wo + j) * s.T * s.C + t * s.C;
            if (select) {
              stem_select_row(v0, v0 + s.C, v0 + 2 * s.C, v0 + 3 * s.C, pp + at, s.C, yp + at);
            } else {
              stem_pool_row(v0, v0 + s.C, v0 + 2 * s.C, v0 + 3 * s.C, s.C, yp + at, pp + at);
            }
          }
        }
      }
    });
  });
  if (select) return {y};
  return {y, phase};
}

// gw [T, C_in*9, C] (compute dtype) = sum over windows of gy * (input patch at the winner).
Tensor stem_weight_grad(const Tensor& gy, const Tensor& x, const Tensor& phase, int64_t tasks,
                        int64_t C, at::ScalarType w_dtype) {
  check_cl(x, "x");
  const Tensor g = gy.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor ph = phase.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), H = x.size(2) - 2, W = x.size(3) - 2, Ci = x.size(1) / tasks;
  const int64_t K = Ci * 9, Ho = H / 2, Wo = W / 2;
  TORCH_CHECK(g.size(1) == tasks * C && g.size(2) == Ho && g.size(3) == Wo,
              "stem_weight_grad: gy does not match x");
  Tensor gw = at::empty({tasks, K, C}, x.options().dtype(w_dtype));
  dispatch_pair(x.scalar_type(), g.scalar_type(), "stem_weight_grad", [&](auto in_v, auto out_v, auto op_v) {
    using in_t = decltype(in_v);
    using out_t = decltype(out_v);
    using opmath_t = decltype(op_v);
    TORCH_CHECK(w_dtype == c10::CppTypeToScalarType<opmath_t>::value,
                "stem_weight_grad: w dtype must be the compute dtype");
    const in_t* xp = static_cast<const in_t*>(x.const_data_ptr());
    const out_t* gp = static_cast<const out_t*>(g.const_data_ptr());
    const uint8_t* pp = ph.const_data_ptr<uint8_t>();
    const int64_t total = tasks * K * C;
    ThreadSums<opmath_t> sums(total);
    at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
      opmath_t* mine = sums.mine();
      std::vector<opmath_t> nbs(Wo * 4 * K), gs(Wo * 4 * C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / Ho, i = item % Ho;
        for (int64_t t = 0; t < tasks; ++t) {
          for (int64_t j = 0; j < Wo; ++j) {
            stem_patches<in_t, opmath_t>(xp, H + 2, W + 2, tasks * Ci, Ci, n, t, i, j,
                                         nbs.data() + j * 4 * K);
            const int64_t at = ((n * Ho + i) * Wo + j) * tasks * C + t * C;
            opmath_t* o = gs.data() + j * 4 * C;
            stem_split_window(gp + at, pp + at, C, o, o + C, o + 2 * C, o + 3 * C);
          }
          stem_grad_row(gs.data(), nbs.data(), Wo, K, C, mine + t * K * C);
        }
      }
    });
    opmath_t* out = gw.data_ptr<opmath_t>();
    for (int64_t e = 0; e < total; ++e) out[e] = sums.total(e);
  });
  return gw;
}

// Weight gradient of y = conv2d(x, w, padding=1, groups=G) for channels_last x and gy:
// gw[g] = gy_g^T cols_g, with cols_g [P, 9 * Cin] the zero-padded 3x3 patches of group g's
// input channels at the P = N * H * W output positions (k order ky, kx, ci: channels_last
// weight order) and gy_g [P, Cout]. Group by group, so that a group's patches are still in
// cache for its matrix product (at::mm: oneDNN / MKL, float accumulation; serial inside the
// parallel loop). Returns [G * Cout, Cin, 3, 3] with channels_last strides.
Tensor conv3x3_weight_grad(const Tensor& x, const Tensor& gy, int64_t groups) {
  check_cl(x, "x");
  check_cl(gy, "gy");
  TORCH_CHECK(x.scalar_type() == gy.scalar_type(), "conv3x3_weight_grad: x and gy dtypes differ");
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), G = groups;
  TORCH_CHECK(G >= 1 && x.size(1) % G == 0 && gy.size(1) % G == 0,
              "conv3x3_weight_grad: channels must divide into groups");
  TORCH_CHECK(gy.size(0) == N && gy.size(2) == H && gy.size(3) == W,
              "conv3x3_weight_grad: gy must match x's batch and spatial size (padding 1)");
  const int64_t Cin = x.size(1) / G, Cout = gy.size(1) / G, P = N * H * W;
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor gw = at::empty({G, Cout, 9 * Cin}, options);
  const int64_t esz = x.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const char* gp = static_cast<const char*>(gy.const_data_ptr());
  const int64_t row = Cin * esz, tile_w = W + 2;  // bytes per pixel; a padded tile's width
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    Tensor cols = at::empty({P, 9 * Cin}, options);
    Tensor gyt = at::empty({P, Cout}, options);
    // One image of one group, zero-padded, [H + 2][W + 2][Cin]: the group's channels are 1/G
    // of every pixel of x, so they are gathered once here (one strided read per pixel), and
    // each patch row is then three contiguous runs of 3 * Cin from this L1-sized tile.
    std::vector<char> tile((H + 2) * tile_w * row, 0);  // the border stays zero
    char* cp = static_cast<char*>(cols.data_ptr());
    char* tp = static_cast<char*>(gyt.data_ptr());
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t y = 0; y < H; ++y) {
          for (int64_t xx = 0; xx < W; ++xx) {
            const int64_t pix = (n * H + y) * W + xx;
            std::memcpy(tile.data() + ((y + 1) * tile_w + xx + 1) * row,
                        xp + (pix * G + g) * row, row);
            std::memcpy(tp + pix * Cout * esz, gp + (pix * G + g) * Cout * esz, Cout * esz);
          }
        }
        for (int64_t y = 0; y < H; ++y) {
          for (int64_t xx = 0; xx < W; ++xx) {
            char* dst = cp + ((n * H + y) * W + xx) * 9 * row;
            for (int64_t i = 0; i < 3; ++i) {
              std::memcpy(dst + i * 3 * row, tile.data() + ((y + i) * tile_w + xx) * row, 3 * row);
            }
          }
        }
      }
      Tensor out = gw.select(0, g);
      at::mm_out(out, gyt.t(), cols);
    }
  });
  return gw.view({G * Cout, 3, 3, Cin}).permute({0, 3, 1, 2});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_stats_forward", &pool_stats_forward, "2x2 max-pool (+ uint8 phase) and BN stats");
  m.def("pool_backward", &pool_backward, "unpool + BN statistics gradient");
  m.def("pool_gather", &pool_gather, "values at each window's winner");
  m.def("pool_backward_backward", &pool_backward_backward, "derivatives of pool_backward");
  m.def("affine_relu_forward", &affine_relu_forward, "relu(scale * p + shift), cast on write");
  m.def("affine_relu_backward", &affine_relu_backward, "its input, scale and shift gradients");
  m.def("affine_relu_double_backward", &affine_relu_double_backward, "derivatives of the backward");
  m.def("relayout", &relayout, "weights between contiguous and channels_last, cast");
  m.def("conv3x3_weight_grad", &conv3x3_weight_grad, "grouped 3x3 conv weight gradient, gather + mm");
  m.def("stem_run", &stem_run, "first conv + 2x2 max-pool (or conv at given winners)");
  m.def("stem_weight_grad", &stem_weight_grad, "first conv weight gradient through the pool");
}
