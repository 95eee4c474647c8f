// Products of a dense matrix with a masked kernel, for the sparse-kernel
// benchmark (benchmarks/sparse_kernels.py, path "compiled"). Built at run time
// by benchmarks/compiled_kernel.py with g++ against the installed TensorFlow.
//
// The kernel w is [K, N] with zeros outside its mask; the mask's active
// entries are indexed once (FtMaskIndex) both by row (CSR) and by column
// (CSC). Every product works on batch-transposed copies so that the batch is
// the contiguous, vectorized dimension:
//   FtSpmm:          y  = x @ w,    y[b, j]  = sum over active (i, j) of x[b, i] w[i, j]
//   FtSpmmInputGrad: dx = dy @ w^T, dx[b, i] = sum over active (i, j) of dy[b, j] w[i, j]
//   FtSddmm:         dw = x^T @ dy at the active entries, zero elsewhere.
// and, for convolutions (whose forward pass and input gradient are the
// library's sparse convolution, keras_freetickets.native.sparse_conv2d):
//   FtConvKernelGrad: a SAME convolution's kernel gradient at the kernel's
//                     nonzeros, zero elsewhere.
// Each output element is summed by one thread in index order, so results do
// not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace ft {
using namespace tensorflow;  // NOLINT: op registration macros need it.

typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// out[c * ld_out + r] = a[r * cols + c] for r < rows and c < used_cols.
#ifdef __AVX2__
inline void Transpose8(const float* a, size_t lda, float* o, size_t ldo) {
  __m256 r[8], t[8], s[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(a + q * lda);
  for (int q = 0; q < 4; ++q) {
    t[2 * q] = _mm256_unpacklo_ps(r[2 * q], r[2 * q + 1]);
    t[2 * q + 1] = _mm256_unpackhi_ps(r[2 * q], r[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(o + q * ldo, _mm256_permute2f128_ps(s[q], s[q + 4], 0x20));
    _mm256_storeu_ps(o + (q + 4) * ldo, _mm256_permute2f128_ps(s[q], s[q + 4], 0x31));
  }
}
#endif

void Transpose(const float* a, int rows, int cols, int used_cols, float* out,
               int ld_out) {
  int r8 = 0, c8 = 0;
#ifdef __AVX2__
  r8 = rows / 8 * 8;
  c8 = used_cols / 8 * 8;
  for (int r = 0; r < r8; r += 8)
    for (int c = 0; c < c8; c += 8)
      Transpose8(a + static_cast<size_t>(r) * cols + c, cols,
                 out + static_cast<size_t>(c) * ld_out + r, ld_out);
#endif
  for (int r = 0; r < rows; ++r)
    for (int c = (r < r8 ? c8 : 0); c < used_cols; ++c)
      out[static_cast<size_t>(c) * ld_out + r] = a[static_cast<size_t>(r) * cols + c];
}

// Scratch memory kept by each calling thread from call to call: allocating
// and freeing these buffers at every step costs page faults.
float* Scratch(std::vector<float>* buffer, size_t size) {
  if (buffer->size() < size) buffer->resize(size);
  return buffer->data();
}

// A [rows, cols] matrix copied to [cols, padded rows], padding zeroed.
float* ToBatchMinor(const float* a, int rows, int cols, int padded,
                    std::vector<float>* buffer) {
  float* out = Scratch(buffer, static_cast<size_t>(cols) * padded);
  if (padded != rows) std::fill(out, out + static_cast<size_t>(cols) * padded, 0.f);
  Transpose(a, rows, cols, cols, out, padded);
  return out;
}

int Padded(int batch) { return (batch + 15) / 16 * 16; }

void ParallelFor(OpKernelContext* ctx, int64_t units, int64_t cost,
                 const std::function<void(int64_t, int64_t)>& work) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
  Shard(pool->num_threads, pool->workers, units, cost, work);
}

Status CheckIndex(const Tensor& ptr, const Tensor& idx, int outer, int inner) {
  if (ptr.dims() != 1 || ptr.dim_size(0) != outer + 1 || idx.dims() != 1)
    return errors::InvalidArgument("index of the wrong shape: ptr ",
                                   ptr.shape().DebugString(), " for ", outer,
                                   " rows");
  const int* p = ptr.flat<int>().data();
  const int* q = idx.flat<int>().data();
  if (p[0] != 0 || p[outer] != idx.dim_size(0))
    return errors::InvalidArgument("index ptr does not span its indices");
  for (int o = 0; o < outer; ++o)
    if (p[o + 1] < p[o]) return errors::InvalidArgument("index ptr decreases");
  for (int64_t s = 0; s < idx.dim_size(0); ++s)
    if (q[s] < 0 || q[s] >= inner)
      return errors::InvalidArgument("index entry ", q[s], " out of [0, ", inner, ")");
  return absl::OkStatus();
}

// out[b, o] = sum over s in ptr[o]..ptr[o+1] of in[b, idx[s]] * value(o, idx[s]),
// value(o, i) = w[i * N + o] (kByColumn) or w[o * N + i].
template <bool kByColumn>
void Product(OpKernelContext* ctx, const Tensor& in, const Tensor& w,
             const Tensor& ptr_t, const Tensor& idx_t, int out_units) {
  const int batch = in.dim_size(0), in_units = in.dim_size(1);
  const int n = w.dim_size(1);
  const int* ptr = ptr_t.flat<int>().data();
  const int* idx = idx_t.flat<int>().data();
  const float* wp = w.flat<float>().data();
  Tensor* out;
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, out_units}), &out));
  if (batch == 0) return;
  const int bp = Padded(batch);
  static thread_local std::vector<float> in_buffer, out_buffer, value_buffer;
  const float* xt = ToBatchMinor(in.flat<float>().data(), batch, in_units, bp, &in_buffer);
  float* yt = Scratch(&out_buffer, static_cast<size_t>(out_units) * bp);
  float* values = Scratch(&value_buffer, idx_t.dim_size(0));
  for (int o = 0; o < out_units; ++o)
    for (int s = ptr[o]; s < ptr[o + 1]; ++s)
      values[s] = kByColumn ? wp[static_cast<size_t>(idx[s]) * n + o]
                            : wp[static_cast<size_t>(o) * n + idx[s]];
  const float* val = values;
  auto work = [&](int64_t o0, int64_t o1) {
    for (int o = o0; o < o1; ++o) {
      for (int b0 = 0; b0 < bp; b0 += 128) {
        float* yr = yt + static_cast<size_t>(o) * bp + b0;
        if (bp - b0 >= 128) {  // eight accumulators in registers
          v16 a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
          for (int s = ptr[o]; s < ptr[o + 1]; ++s) {
            const float* xr = xt + static_cast<size_t>(idx[s]) * bp + b0;
            const float v = val[s];
            a0 += v * Load(xr);      a1 += v * Load(xr + 16);
            a2 += v * Load(xr + 32); a3 += v * Load(xr + 48);
            a4 += v * Load(xr + 64); a5 += v * Load(xr + 80);
            a6 += v * Load(xr + 96); a7 += v * Load(xr + 112);
          }
          Store(yr, a0);      Store(yr + 16, a1); Store(yr + 32, a2);
          Store(yr + 48, a3); Store(yr + 64, a4); Store(yr + 80, a5);
          Store(yr + 96, a6); Store(yr + 112, a7);
        } else {
          for (int t = 0; t < bp - b0; t += 16) {
            v16 a{};
            for (int s = ptr[o]; s < ptr[o + 1]; ++s)
              a += val[s] * Load(xt + static_cast<size_t>(idx[s]) * bp + b0 + t);
            Store(yr + t, a);
          }
        }
      }
    }
  };
  const int64_t per_unit = 1 + static_cast<int64_t>(bp) * idx_t.dim_size(0) / std::max(1, out_units);
  ParallelFor(ctx, out_units, per_unit, work);
  Transpose(yt, out_units, bp, batch, out->flat<float>().data(), out_units);
}

class MaskIndexOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& mask = ctx->input(0);
    OP_REQUIRES(ctx, mask.dims() == 2,
                errors::InvalidArgument("mask must be 2-D, got ", mask.shape().DebugString()));
    const int k = mask.dim_size(0), n = mask.dim_size(1);
    const bool* m = mask.flat<bool>().data();
    Tensor *row_ptr, *col_ptr, *row_cols, *col_rows;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({k + 1}), &row_ptr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n + 1}), &col_ptr));
    int* rp = row_ptr->flat<int>().data();
    int* cp = col_ptr->flat<int>().data();
    std::vector<int> per_column(n, 0);
    rp[0] = 0;
    for (int i = 0; i < k; ++i) {
      const bool* row = m + static_cast<size_t>(i) * n;
      int count = 0;
      for (int j = 0; j < n; ++j) { count += row[j]; per_column[j] += row[j]; }
      rp[i + 1] = rp[i] + count;
    }
    cp[0] = 0;
    for (int j = 0; j < n; ++j) cp[j + 1] = cp[j] + per_column[j];
    const int nnz = rp[k];
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({nnz}), &row_cols));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({nnz}), &col_rows));
    int* rc = row_cols->flat<int>().data();
    int* cr = col_rows->flat<int>().data();
    std::vector<int> next(cp, cp + n);
    for (int i = 0; i < k; ++i) {
      const bool* row = m + static_cast<size_t>(i) * n;
      int s = rp[i];
      for (int j = 0; j < n; ++j)
        if (row[j]) { rc[s++] = j; cr[next[j]++] = i; }
    }
  }
};

// FtSpmm (kByColumn: x @ w) and FtSpmmInputGrad (dy @ w^T): inputs (a, w,
// ptr, idx), where a's columns pair with w's rows (FtSpmm) or columns.
template <bool kByColumn>
class ProductOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor &a = ctx->input(0), &w = ctx->input(1);
    const int paired = kByColumn ? 0 : 1;  // w's dimension that meets a's columns
    OP_REQUIRES(ctx, a.dims() == 2 && w.dims() == 2 && a.dim_size(1) == w.dim_size(paired),
                errors::InvalidArgument(kByColumn ? "x " : "dy ", a.shape().DebugString(),
                                        " and w ", w.shape().DebugString(), " do not multiply"));
    const int out_units = w.dim_size(1 - paired);
    OP_REQUIRES_OK(ctx, CheckIndex(ctx->input(2), ctx->input(3), out_units, w.dim_size(paired)));
    Product<kByColumn>(ctx, a, w, ctx->input(2), ctx->input(3), out_units);
  }
};

class SddmmOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor &x = ctx->input(0), &dy = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() == 2 && dy.dims() == 2 && x.dim_size(0) == dy.dim_size(0),
                errors::InvalidArgument("x ", x.shape().DebugString(), " and dy ",
                                        dy.shape().DebugString(), " differ in batch"));
    const int batch = x.dim_size(0), k = x.dim_size(1), n = dy.dim_size(1);
    OP_REQUIRES_OK(ctx, CheckIndex(ctx->input(2), ctx->input(3), k, n));
    const int* rp = ctx->input(2).flat<int>().data();
    const int* rc = ctx->input(3).flat<int>().data();
    Tensor* dw;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({k, n}), &dw));
    float* dwp = dw->flat<float>().data();
    const int bp = Padded(std::max(batch, 1));
    static thread_local std::vector<float> x_buffer, dy_buffer;
    const float* xt = ToBatchMinor(x.flat<float>().data(), batch, k, bp, &x_buffer);
    const float* dyt = ToBatchMinor(dy.flat<float>().data(), batch, n, bp, &dy_buffer);
    auto work = [&](int64_t i0, int64_t i1) {
      std::memset(dwp + i0 * n, 0, (i1 - i0) * n * sizeof(float));
      for (int i = i0; i < i1; ++i) {
        const float* xr = xt + static_cast<size_t>(i) * bp;
        for (int s = rp[i]; s < rp[i + 1]; ++s) {
          const float* dr = dyt + static_cast<size_t>(rc[s]) * bp;
          v16 acc{};
          for (int b = 0; b < bp; b += 16) acc += Load(xr + b) * Load(dr + b);
          float sum = 0.f;
          for (int q = 0; q < 16; ++q) sum += acc[q];
          dwp[static_cast<size_t>(i) * n + rc[s]] = sum;
        }
      }
    };
    ParallelFor(ctx, k, 1 + static_cast<int64_t>(bp) * rp[k] / std::max(1, k), work);
  }
};

// FtConvKernelGrad(x, dy, kernel) -> dkernel: the gradient of a stride-1
// "SAME" 2-D convolution (NHWC, odd kernel sizes) with respect to its
// kernel, at the kernel's nonzeros only (exactly zero elsewhere):
// dk[ky, kx, ci, co] = sum over n, y, x of xpad[n, y + ky, x + kx, ci] *
// dy[n, y, x, co]. Blocks of 16 samples are copied batch-minor (the batch
// vectorized, as in the library's sparse convolution), each nonzero's sum is
// kept per 16 lanes and per shard, and the shards are summed in order.
class ConvKernelGradOp : public OpKernel {
 public:
  explicit ConvKernelGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    const Tensor& k = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() == 4 && dy.dims() == 4 && k.dims() == 4,
                errors::InvalidArgument("FtConvKernelGrad takes rank-4 x, dy, kernel"));
    const int N = x.dim_size(0), H = x.dim_size(1), W = x.dim_size(2), C = x.dim_size(3);
    const int KH = k.dim_size(0), KW = k.dim_size(1), O = k.dim_size(3);
    OP_REQUIRES(ctx, KH % 2 == 1 && KW % 2 == 1 && k.dim_size(2) == C &&
                         dy.dim_size(0) == N && dy.dim_size(1) == H &&
                         dy.dim_size(2) == W && dy.dim_size(3) == O,
                errors::InvalidArgument(
                    "FtConvKernelGrad: odd kernel sizes and a SAME output "
                    "expected. Received: x ", x.shape().DebugString(), ", dy ",
                    dy.shape().DebugString(), ", kernel ", k.shape().DebugString()));
    const int pt = (KH - 1) / 2, pl = (KW - 1) / 2;
    const int Hp = H + KH - 1, Wp = W + KW - 1;
    const size_t plane = static_cast<size_t>(Hp) * Wp * 16;
    const size_t oplane = static_cast<size_t>(H) * W * 16;
    Tensor* dk = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, k.shape(), &dk));
    float* dkp = dk->flat<float>().data();
    std::fill(dkp, dkp + k.NumElements(), 0.f);
    const float* kp = k.flat<float>().data();
    std::vector<int> ptr(O + 1, 0), xoff, pos;
    for (int co = 0; co < O; ++co) {
      for (int ci = 0; ci < C; ++ci)
        for (int ky = 0; ky < KH; ++ky)
          for (int kx = 0; kx < KW; ++kx) {
            const size_t at = ((static_cast<size_t>(ky) * KW + kx) * C + ci) * O + co;
            if (kp[at] != 0.f) {
              xoff.push_back(static_cast<int>(ci * plane + (static_cast<size_t>(ky) * Wp + kx) * 16));
              pos.push_back(static_cast<int>(at));
            }
          }
      ptr[co + 1] = xoff.size();
    }
    const int nnz = xoff.size();
    if (nnz == 0 || N == 0) return;
    const int tiles = (N + 15) / 16;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    const int shards = std::max(1, std::min(tiles, pool->num_threads));
    std::vector<std::vector<float>> partial(
        shards, std::vector<float>(static_cast<size_t>(nnz) * 16, 0.f));
    const float* xp = x.flat<float>().data();
    const float* dyp = dy.flat<float>().data();
    auto work = [&](int64_t s0, int64_t s1) {
      std::vector<float> xbuf(plane * C, 0.f), dbuf(oplane * O, 0.f);
      for (int64_t sh = s0; sh < s1; ++sh) {
        float* part = partial[sh].data();
        for (int t = sh * tiles / shards; t < (sh + 1) * tiles / shards; ++t) {
          const int n0 = t * 16, nv = std::min(16, N - n0);
          if (nv < 16) {  // unused lanes read zeros
            std::fill(xbuf.begin(), xbuf.end(), 0.f);
            std::fill(dbuf.begin(), dbuf.end(), 0.f);
          }
          for (int n = 0; n < nv; ++n) {
            const float* src = xp + static_cast<size_t>(n0 + n) * H * W * C;
            for (int yy = 0; yy < H; ++yy)
              for (int xx = 0; xx < W; ++xx)
                for (int ci = 0; ci < C; ++ci)
                  xbuf[ci * plane + (static_cast<size_t>(yy + pt) * Wp + xx + pl) * 16 + n] =
                      src[(static_cast<size_t>(yy) * W + xx) * C + ci];
            const float* dsrc = dyp + static_cast<size_t>(n0 + n) * H * W * O;
            for (int p = 0; p < H * W; ++p)
              for (int co = 0; co < O; ++co)
                dbuf[co * oplane + static_cast<size_t>(p) * 16 + n] = dsrc[static_cast<size_t>(p) * O + co];
          }
          for (int co = 0; co < O; ++co) {
            const float* d = dbuf.data() + co * oplane;
            for (int s = ptr[co]; s < ptr[co + 1]; ++s) {
              const float* xb = xbuf.data() + xoff[s];
              v16 a0{}, a1{}, a2{}, a3{};
              for (int oy = 0; oy < H; ++oy) {
                const float* xr = xb + static_cast<size_t>(oy) * Wp * 16;
                const float* dr = d + static_cast<size_t>(oy) * W * 16;
                int ox = 0;
                for (; ox + 4 <= W; ox += 4) {
                  a0 += Load(xr + (ox + 0) * 16) * Load(dr + (ox + 0) * 16);
                  a1 += Load(xr + (ox + 1) * 16) * Load(dr + (ox + 1) * 16);
                  a2 += Load(xr + (ox + 2) * 16) * Load(dr + (ox + 2) * 16);
                  a3 += Load(xr + (ox + 3) * 16) * Load(dr + (ox + 3) * 16);
                }
                for (; ox < W; ++ox) a0 += Load(xr + ox * 16) * Load(dr + ox * 16);
              }
              const v16 sum = (a0 + a1) + (a2 + a3);
              float* pp = part + static_cast<size_t>(s) * 16;
              for (int l = 0; l < 16; ++l) pp[l] += sum[l];
            }
          }
        }
      }
    };
    Shard(pool->num_threads, pool->workers, shards, int64_t{1} << 30, work);
    for (int s = 0; s < nnz; ++s) {
      float total = 0.f;
      for (int sh = 0; sh < shards; ++sh)
        for (int l = 0; l < 16; ++l) total += partial[sh][static_cast<size_t>(s) * 16 + l];
      dkp[pos[s]] = total;
    }
  }
};

Status MatrixOut(shape_inference::InferenceContext* c, int rows_of, int rows_dim,
                 int cols_of, int cols_dim) {
  c->set_output(0, c->Matrix(c->Dim(c->input(rows_of), rows_dim),
                             c->Dim(c->input(cols_of), cols_dim)));
  return absl::OkStatus();
}

REGISTER_OP("FtMaskIndex")
    .Input("mask: bool")
    .Output("row_ptr: int32").Output("row_cols: int32")
    .Output("col_ptr: int32").Output("col_rows: int32")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::DimensionHandle rows, cols;
      TF_RETURN_IF_ERROR(c->Add(c->Dim(c->input(0), 0), 1, &rows));
      TF_RETURN_IF_ERROR(c->Add(c->Dim(c->input(0), 1), 1, &cols));
      c->set_output(0, c->Vector(rows));
      c->set_output(1, c->Vector(c->UnknownDim()));
      c->set_output(2, c->Vector(cols));
      c->set_output(3, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    });
REGISTER_OP("FtSpmm")
    .Input("x: float").Input("w: float").Input("col_ptr: int32").Input("col_rows: int32")
    .Output("y: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return MatrixOut(c, 0, 0, 1, 1); });
REGISTER_OP("FtSpmmInputGrad")
    .Input("dy: float").Input("w: float").Input("row_ptr: int32").Input("row_cols: int32")
    .Output("dx: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return MatrixOut(c, 0, 0, 1, 0); });
REGISTER_OP("FtSddmm")
    .Input("x: float").Input("dy: float").Input("row_ptr: int32").Input("row_cols: int32")
    .Output("dw: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return MatrixOut(c, 0, 1, 1, 1); });

REGISTER_KERNEL_BUILDER(Name("FtMaskIndex").Device(DEVICE_CPU), MaskIndexOp);
REGISTER_KERNEL_BUILDER(Name("FtSpmm").Device(DEVICE_CPU), ProductOp<true>);
REGISTER_KERNEL_BUILDER(Name("FtSpmmInputGrad").Device(DEVICE_CPU), ProductOp<false>);
REGISTER_KERNEL_BUILDER(Name("FtSddmm").Device(DEVICE_CPU), SddmmOp);
REGISTER_OP("FtConvKernelGrad")
    .Input("x: float").Input("dy: float").Input("kernel: float")
    .Output("dkernel: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(2));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("FtConvKernelGrad").Device(DEVICE_CPU), ConvKernelGradOp);
}  // namespace ft
