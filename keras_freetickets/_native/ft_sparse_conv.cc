// A sparse direct 2-D convolution for inference, as a TensorFlow CPU op.
//
// FtSparseConv2D(input, kernel, bias; padding, relu, pool) -> output is
// maxpool_P(act(conv2d(input, kernel, strides 1, padding) + bias)) in NHWC,
// act being ReLU or the identity and P 1 (no pooling) or 2 (2x2 windows,
// stride 2, VALID), which is what a Keras Conv2D (strides 1, dilation 1,
// relu or linear) followed by MaxPooling2D(2) computes. It reads only the
// kernel's nonzeros: each output channel sums, in (ci, ky, kx) order, over
// its nonzero weights (indexed at every call: the kernel is whatever the
// layer holds now), so its cost follows the kernel's density, where
// TensorFlow's convolution costs the same at any sparsity.
//
// The batch is the vectorized dimension: 16 samples at a time are copied
// into a zero-padded [ci][y][x][16] block (16x16 AVX-512 transposes where
// the channels allow), every output row is accumulated as 8-column chunks
// held in registers, one fused multiply-add per nonzero, column and 16
// samples, then pooled and transposed back. Blocks of samples are shared out
// over TensorFlow's intra-op threads; each output is summed by one thread
// in a fixed order, so results do not depend on the thread count. They
// differ from TensorFlow's convolution by float rounding only (the sums run
// in another order; zero weights are skipped, so an infinite input times a
// zero weight gives no NaN here). Built by keras_freetickets/native.py with
// the build machine's instruction set (-march=native).
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <vector>
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace ft_sparse_conv {
using namespace tensorflow;  // NOLINT: the registration macros need it.

typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
constexpr int kLanes = 16;
constexpr int kChunk = 8;

#ifdef __AVX512F__
inline void Transpose16(const float* src, size_t ss, float* dst, size_t ds) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    _mm512_storeu_ps(dst + (0 + j) * ds, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(dst + (4 + j) * ds, _mm512_shuffle_f32x4(v0, v2, 0xDD));
    _mm512_storeu_ps(dst + (8 + j) * ds, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(dst + (12 + j) * ds, _mm512_shuffle_f32x4(v1, v3, 0xDD));
  }
}
constexpr bool kHaveTranspose = true;
#else
inline void Transpose16(const float*, size_t, float*, size_t) {}
constexpr bool kHaveTranspose = false;
#endif

float* Scratch(std::vector<float>* b, size_t n) {
  if (b->size() < n) b->resize(n);
  return b->data();
}

class SparseConvOp : public OpKernel {
 public:
  explicit SparseConvOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    same_ = padding == "SAME";
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pool", &pool_));
    OP_REQUIRES(ctx, pool_ == 1 || pool_ == 2,
                errors::InvalidArgument("FtSparseConv2D: pool must be 1 or 2. Received: pool=", pool_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& b = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() == 4 && k.dims() == 4 && b.dims() == 1,
                errors::InvalidArgument(
                    "FtSparseConv2D takes input [N, H, W, C], kernel [KH, KW, C, O] "
                    "and bias [O]. Received: input ", x.shape().DebugString(),
                    ", kernel ", k.shape().DebugString(), ", bias ",
                    b.shape().DebugString()));
    const int N = x.dim_size(0), H = x.dim_size(1), W = x.dim_size(2), C = x.dim_size(3);
    const int KH = k.dim_size(0), KW = k.dim_size(1), O = k.dim_size(3);
    OP_REQUIRES(ctx, k.dim_size(2) == C && b.dim_size(0) == O,
                errors::InvalidArgument(
                    "FtSparseConv2D: the kernel must have the input's ", C,
                    " channels and the bias one entry per output channel. "
                    "Received: input ", x.shape().DebugString(), ", kernel ",
                    k.shape().DebugString(), ", bias ", b.shape().DebugString()));
    OP_REQUIRES(ctx, C > 0 && KH > 0 && KW > 0,
                errors::InvalidArgument(
                    "FtSparseConv2D needs at least one input channel and a "
                    "non-empty window. Received: input ", x.shape().DebugString(),
                    ", kernel ", k.shape().DebugString()));
    const int pt = same_ ? (KH - 1) / 2 : 0, pl = same_ ? (KW - 1) / 2 : 0;
    const int OH = same_ ? H : std::max(0, H - KH + 1);
    const int OW = same_ ? W : std::max(0, W - KW + 1);
    const int P = pool_, PH = OH / P, PW = OW / P;
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({N, PH, PW, O}), &y));
    if (N == 0 || PH == 0 || PW == 0 || O == 0) return;
    const int used_w = PW * P;  // conv columns that reach the output
    const int chunks = (used_w + kChunk - 1) / kChunk;
    const int Hp = std::max(OH + KH - 1, H + pt);
    const int Wp = std::max(chunks * kChunk + KW - 1, W + pl);
    const size_t plane = static_cast<size_t>(Hp) * Wp * kLanes;
    OP_REQUIRES(ctx, static_cast<int64_t>(plane) * C < (int64_t{1} << 31),
                errors::InvalidArgument(
                    "FtSparseConv2D: one block of 16 padded samples would take "
                    "2^31 floats or more. Received: input ", x.shape().DebugString()));
    // Index of the nonzeros by output channel, then by block of input
    // channels (a block's rows of the transposed input stay in L1 while
    // every output channel reads them); within one, by (ci, ky, kx).
    const int CB = 8, blocks = (C + CB - 1) / CB;
    std::vector<int> ptr(static_cast<size_t>(O) * blocks + 1, 0), off;
    std::vector<float> val;
    const float* kp = k.flat<float>().data();
    for (int co = 0; co < O; ++co) {
      for (int cb = 0; cb < blocks; ++cb) {
        for (int ci = cb * CB; ci < std::min(C, (cb + 1) * CB); ++ci)
          for (int ky = 0; ky < KH; ++ky)
            for (int kx = 0; kx < KW; ++kx) {
              float w = kp[((static_cast<size_t>(ky) * KW + kx) * C + ci) * O + co];
              if (w != 0.f) {
                off.push_back(static_cast<int>(ci * plane + (static_cast<size_t>(ky) * Wp + kx) * kLanes));
                val.push_back(w);
              }
            }
        ptr[static_cast<size_t>(co) * blocks + cb + 1] = off.size();
      }
    }
    const float* xp = x.flat<float>().data();
    const float* bp = b.flat<float>().data();
    float* yp = y->flat<float>().data();
    const int tiles = (N + kLanes - 1) / kLanes;
    const bool relu = relu_;
    const int wc = chunks * kChunk;  // conv columns computed per row
    const size_t row_floats = static_cast<size_t>(wc) * O * kLanes;
    auto work = [&](int64_t t0, int64_t t1) {
      // The transposed input keeps its zero padding from tile to tile: only
      // the interior is written, so it is cleared when the geometry changes.
      thread_local std::vector<float> xbuf, rbuf;
      thread_local std::vector<int> geometry;
      std::vector<int> now = {C, H, W, Hp, Wp, pt, pl};
      float* xt = Scratch(&xbuf, plane * C);
      if (geometry != now) {
        std::memset(xt, 0, plane * C * sizeof(float));
        geometry = now;
      }
      float* rows = Scratch(&rbuf, row_floats * (P + 1));
      float* prow = rows + row_floats * P;  // [PW][O][lane]
      const size_t sample = static_cast<size_t>(H) * W * C;
      const size_t osample = static_cast<size_t>(PH) * PW * O;
      for (int64_t t = t0; t < t1; ++t) {
        const int n0 = t * kLanes, nv = std::min(kLanes, N - n0);
        if (kHaveTranspose && nv == kLanes && C % kLanes == 0) {
          for (int yy = 0; yy < H; ++yy)
            for (int xx = 0; xx < W; ++xx)
              for (int cb = 0; cb < C; cb += kLanes)
                Transpose16(xp + n0 * sample + (static_cast<size_t>(yy) * W + xx) * C + cb, sample,
                            xt + cb * plane + (static_cast<size_t>(yy + pt) * Wp + xx + pl) * kLanes, plane);
        } else {
          for (int n = 0; n < nv; ++n)
            for (int yy = 0; yy < H; ++yy)
              for (int xx = 0; xx < W; ++xx) {
                const float* src = xp + (n0 + n) * sample + (static_cast<size_t>(yy) * W + xx) * C;
                float* dst = xt + (static_cast<size_t>(yy + pt) * Wp + xx + pl) * kLanes + n;
                for (int ci = 0; ci < C; ++ci) dst[ci * plane] = src[ci];
              }
        }
        for (int py = 0; py < PH; ++py) {
          for (int r = 0; r < P; ++r) {
            const int oy = py * P + r;
            float* orow = rows + r * row_floats;
            const float* rowbase = xt + static_cast<size_t>(oy) * Wp * kLanes;
            for (int cb = 0; cb < blocks; ++cb)
              for (int co = 0; co < O; ++co) {
                const int s0 = ptr[static_cast<size_t>(co) * blocks + cb];
                const int s1 = ptr[static_cast<size_t>(co) * blocks + cb + 1];
                const bool last = cb == blocks - 1;
                if (s0 == s1 && cb > 0 && !(last && relu)) continue;
                for (int c = 0; c < chunks; ++c) {
                  const float* base = rowbase + c * kChunk * kLanes;
                  // Conv rows are kept [co][x][lane]: a chunk's accumulators
                  // are contiguous (no 4 KiB-strided stores and reloads).
                  float* dst = orow + (static_cast<size_t>(co) * wc + c * kChunk) * kLanes;
                  const size_t step = kLanes;
                  v16 acc[kChunk];
                  if (cb == 0)
                    for (int j = 0; j < kChunk; ++j) acc[j] = v16{} + bp[co];
                  else
                    for (int j = 0; j < kChunk; ++j) acc[j] = Load(dst + j * step);
                  for (int s = s0; s < s1; ++s) {
                    const float* p = base + off[s];
                    const float w = val[s];
                    for (int j = 0; j < kChunk; ++j) acc[j] += w * Load(p + j * kLanes);
                  }
                  if (relu && last)
                    for (int j = 0; j < kChunk; ++j) acc[j] = acc[j] > 0 ? acc[j] : v16{};
                  for (int j = 0; j < kChunk; ++j) Store(dst + j * step, acc[j]);
                }
              }
          }
          // Max over each P x P window (a copy when P is 1), into [px][co][lane].
          for (int px = 0; px < PW; ++px)
            for (int co = 0; co < O; ++co) {
              const float* src = rows + (static_cast<size_t>(co) * wc + px * P) * kLanes;
              v16 m = Load(src);
              for (int r = 0; r < P; ++r)
                for (int dx = 0; dx < P; ++dx) {
                  v16 v = Load(src + r * row_floats + dx * kLanes);
                  m = m > v ? m : v;
                }
              Store(prow + (static_cast<size_t>(px) * O + co) * kLanes, m);
            }
          const float* out_row = prow;
          float* dst0 = yp + n0 * osample + static_cast<size_t>(py) * PW * O;
          if (kHaveTranspose && nv == kLanes && O % kLanes == 0) {
            for (int px = 0; px < PW; ++px)
              for (int cb = 0; cb < O; cb += kLanes)
                Transpose16(out_row + (static_cast<size_t>(px) * O + cb) * kLanes, kLanes,
                            dst0 + static_cast<size_t>(px) * O + cb, osample);
          } else {
            for (int n = 0; n < nv; ++n)
              for (int px = 0; px < PW; ++px)
                for (int co = 0; co < O; ++co)
                  dst0[n * osample + static_cast<size_t>(px) * O + co] =
                      out_row[(static_cast<size_t>(px) * O + co) * kLanes + n];
          }
        }
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t cost = static_cast<int64_t>(off.size() + C) * PH * P * used_w * kLanes + 1;
    Shard(pool->num_threads, pool->workers, tiles, cost, work);
  }
 private:
  bool same_ = true;
  bool relu_ = false;
  int pool_ = 1;
};

REGISTER_OP("FtSparseConv2D")
    .Input("input: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Attr("padding: {'SAME', 'VALID'} = 'SAME'")
    .Attr("relu: bool = false")
    .Attr("pool: int = 1")
    .Output("output: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle x, k;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
      std::string padding;
      TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
      auto out_dim = [&](int i, int kd) -> shape_inference::DimensionHandle {
        auto d = c->Dim(x, i), kk = c->Dim(k, kd);
        if (padding == "SAME") return d;
        if (!c->ValueKnown(d) || !c->ValueKnown(kk)) return c->UnknownDim();
        return c->MakeDim(std::max<int64_t>(0, c->Value(d) - c->Value(kk) + 1));
      };
      int pool;
      TF_RETURN_IF_ERROR(c->GetAttr("pool", &pool));
      auto pooled = [&](shape_inference::DimensionHandle d) -> shape_inference::DimensionHandle {
        if (pool == 1) return d;
        if (!c->ValueKnown(d)) return c->UnknownDim();
        return c->MakeDim(c->Value(d) / pool);
      };
      c->set_output(0, c->MakeShape({c->Dim(x, 0), pooled(out_dim(1, 0)), pooled(out_dim(2, 1)), c->Dim(k, 3)}));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("FtSparseConv2D").Device(DEVICE_CPU), SparseConvOp);
}  // namespace ft_sparse_conv
