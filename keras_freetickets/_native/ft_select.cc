// Exact k-selection for mask updates, as TensorFlow CPU ops.
//
// FtSelectSmallest(keys, k, after_minimum) -> flags computes what
// keras_freetickets.selection.select_smallest computes with some seventy
// TensorFlow ops: the k smallest int32 keys, the lower flat index first
// among equal keys; with after_minimum, every key below -2**31 + 2**21 (by
// the caller's promise, the minimum's) is flagged too, and k more among the
// rest.
//
// FtSelectByKeys(values, eligible, k, kind) -> flags is
// FtSelectSmallest(where(eligible, KEY(values), -2**31), k, true) with the
// keys of keras_freetickets.masking computed on the fly: kind "magnitude"
// is masking._magnitude_keys (the drop), "descending" is
// masking._descending_keys (the grow). One op instead of the key ops and
// their whole-kernel intermediates.
//
// Three passes over the keys, on one thread, so the flags never depend on
// the thread count: a histogram of the top 11 bits in signed order, a copy
// of the keys in the bucket holding the k-th key (nth_element there finds
// that key, T), and the flags: every key below T, then the keys equal to T
// by increasing index until k are flagged.
//
// FtMaskedApplyMomentum(var, accum, lr, grad, mask, momentum) and
// FtMaskedApplyGradientDescent(var, alpha, grad, mask) are TensorFlow's
// ResourceApplyKerasMomentum and ResourceApplyGradientDescent given
// where(mask, grad, 0) as the gradient: the masked kernels' SGD update of an
// ordinary train step in one pass over the kernel, where the select and the
// update took two. The same expressions in the same order (built with
// -ffp-contract=off, so no fused multiply-add), hence the same bits.
//
// Built by keras_freetickets/native.py.
#define EIGEN_USE_THREADS
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/util/work_sharder.h"

namespace ft_select {
using namespace tensorflow;  // NOLINT: the registration macros need it.

absl::Status VectorLike(shape_inference::InferenceContext* c, int vector,
                        int like, int scalar) {
  shape_inference::ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(vector), 1, &unused));
  if (like >= 0) {
    TF_RETURN_IF_ERROR(c->Merge(c->input(vector), c->input(like), &unused));
  }
  TF_RETURN_IF_ERROR(c->WithRank(c->input(scalar), 0, &unused));
  c->set_output(0, c->input(vector));
  return absl::OkStatus();
}

REGISTER_OP("FtSelectSmallest")
    .Input("keys: int32")
    .Input("k: int32")
    .Input("after_minimum: bool")
    .Output("flags: bool")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
      return VectorLike(c, 0, -1, 1);
    });

REGISTER_OP("FtSelectByKeys")
    .Input("values: float")
    .Input("eligible: bool")
    .Input("k: int32")
    .Attr("kind: {'magnitude', 'descending'}")
    .Output("flags: bool")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      return VectorLike(c, 0, 1, 2);
    });

constexpr int kTopBits = 11;
constexpr int kBuckets = 1 << kTopBits;
constexpr int kShift = 32 - kTopBits;
constexpr int32_t kMinimum = INT32_MIN;

// The top digit in signed order: -2**31 is in bucket 0.
inline uint32_t TopDigit(int32_t key) {
  return (static_cast<uint32_t>(key) ^ 0x80000000u) >> kShift;
}

// `key` where eligible, else the minimum, without a branch: which entries
// are eligible (a sparse mask) is as good as random to a branch predictor.
inline int32_t Eligible(uint8_t eligible, int32_t key) {
  const uint32_t keep = 0u - static_cast<uint32_t>(eligible);  // all ones or 0
  return static_cast<int32_t>((static_cast<uint32_t>(key) & keep) |
                              (static_cast<uint32_t>(kMinimum) & ~keep));
}

// masking._magnitude_keys: |w|'s bits + 2**23 (wrapping), at least
// 2**24 - 1 as int32.
inline int32_t MagnitudeKey(uint32_t bits) {
  const uint32_t shifted = (bits & 0x7FFFFFFFu) + (1u << 23);
  return std::max(static_cast<int32_t>(shifted), (1 << 24) - 1);
}

// masking._descending_keys: 0x7F7FFFFF - bits (wrapping), at most
// 0x7F000000 as uint32.
inline int32_t DescendingKey(uint32_t bits) {
  const uint32_t flipped = 0x7F7FFFFFu - bits;
  return static_cast<int32_t>(std::min(flipped, 0x7F000000u));
}

// The keys of FtSelectByKeys, in one loop the compiler vectorizes: the
// float bits read as integers, the flags as bytes, no aliasing (as a loop
// over floats and bools it was not vectorized, and took 5x as long).
template <int32_t (*KeyOf)(uint32_t)>
void WriteKeys(const float* values, const bool* eligible, int64_t n,
               int32_t* keys) {
  const uint32_t* __restrict bits = reinterpret_cast<const uint32_t*>(values);
  const uint8_t* __restrict flags = reinterpret_cast<const uint8_t*>(eligible);
  int32_t* __restrict out = keys;
  for (int64_t i = 0; i < n; ++i) out[i] = Eligible(flags[i], KeyOf(bits[i]));
}

void Select(const int32_t* keys, int64_t n, int64_t k, bool after_minimum,
            bool* flags) {
  if (n == 0) return;
  // Four histograms, summed after: consecutive keys often share a bucket
  // (the minimum's), and one count's increments would wait on each other.
  // 32-bit counts (the ops refuse 2**31 keys or more): all four fit in
  // 32 KiB, a first-level cache.
  std::vector<uint32_t> part(4 * kBuckets, 0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++part[TopDigit(keys[i])];
    ++part[kBuckets + TopDigit(keys[i + 1])];
    ++part[2 * kBuckets + TopDigit(keys[i + 2])];
    ++part[3 * kBuckets + TopDigit(keys[i + 3])];
  }
  for (; i < n; ++i) ++part[TopDigit(keys[i])];
  std::vector<int64_t> counts(kBuckets);
  for (int b = 0; b < kBuckets; ++b) {
    counts[b] = int64_t{part[b]} + part[kBuckets + b] +
                part[2 * kBuckets + b] + part[3 * kBuckets + b];
  }
  if (after_minimum) k += counts[0];
  k = std::min(k, n);
  if (k <= 0) {
    std::fill(flags, flags + n, false);
    return;
  }
  // The bucket holding the k-th smallest key, and the keys before it.
  int64_t before = 0;
  uint32_t bucket = 0;
  while (before + counts[bucket] < k) before += counts[bucket++];
  // Every key is written and the end moves past the bucket's only (no
  // branch to mispredict); one spare slot takes the last write.
  std::vector<int32_t> in_bucket(counts[bucket] + 1);
  int64_t end = 0;
  for (i = 0; i < n; ++i) {
    in_bucket[end] = keys[i];
    end += TopDigit(keys[i]) == bucket;
  }
  in_bucket.resize(end);
  const int64_t rank = k - before;  // 1-based, within the bucket
  std::nth_element(in_bucket.begin(), in_bucket.begin() + (rank - 1),
                   in_bucket.end());
  const int32_t threshold = in_bucket[rank - 1];
  int64_t below = before, ties = 0;
  for (int32_t value : in_bucket) {
    below += value < threshold;
    ties += value == threshold;
  }
  int64_t ties_wanted = k - below;
  if (ties == ties_wanted) {  // the usual case: every tie is taken
    for (i = 0; i < n; ++i) flags[i] = keys[i] <= threshold;
    return;
  }
  for (i = 0; i < n; ++i) {
    bool take = keys[i] < threshold;
    if (keys[i] == threshold && ties_wanted > 0) {
      take = true;
      --ties_wanted;
    }
    flags[i] = take;
  }
}

void CheckInputs(OpKernelContext* ctx, int vector, int like, int scalar) {
  const Tensor& v = ctx->input(vector);
  OP_REQUIRES(ctx, TensorShapeUtils::IsVector(v.shape()),
              errors::InvalidArgument("The first input must be a vector; got "
                                      "shape ", v.shape().DebugString()));
  OP_REQUIRES(ctx, v.NumElements() < (int64_t{1} << 31),
              errors::InvalidArgument("At most 2**31 - 1 entries; got ",
                                      v.NumElements()));
  if (like >= 0) {
    OP_REQUIRES(ctx, ctx->input(like).shape() == v.shape(),
                errors::InvalidArgument(
                    "eligible must have the shape of values, ",
                    v.shape().DebugString(), "; got ",
                    ctx->input(like).shape().DebugString()));
  }
  OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(ctx->input(scalar).shape()),
              errors::InvalidArgument("k must be a scalar; got shape ",
                                      ctx->input(scalar).shape().DebugString()));
}

class FtSelectSmallestOp : public OpKernel {
 public:
  explicit FtSelectSmallestOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    CheckInputs(ctx, 0, -1, 1);
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(ctx->input(2).shape()),
                errors::InvalidArgument("after_minimum must be a scalar"));
    const Tensor& keys = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, keys.shape(), &out));
    Select(keys.flat<int32>().data(), keys.NumElements(),
           ctx->input(1).scalar<int32>()(), ctx->input(2).scalar<bool>()(),
           out->flat<bool>().data());
  }
};

class FtSelectByKeysOp : public OpKernel {
 public:
  explicit FtSelectByKeysOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string kind;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kind", &kind));
    magnitude_ = kind == "magnitude";
  }

  void Compute(OpKernelContext* ctx) override {
    CheckInputs(ctx, 0, 1, 2);
    if (!ctx->status().ok()) return;
    const Tensor& values = ctx->input(0);
    const int64_t n = values.NumElements();
    Tensor keys;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_INT32, values.shape(), &keys));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, values.shape(), &out));
    const float* v = values.flat<float>().data();
    const bool* eligible = ctx->input(1).flat<bool>().data();
    int32_t* key_data = keys.flat<int32>().data();
    if (magnitude_) {
      WriteKeys<MagnitudeKey>(v, eligible, n, key_data);
    } else {
      WriteKeys<DescendingKey>(v, eligible, n, key_data);
    }
    Select(key_data, n, ctx->input(2).scalar<int32>()(), true,
           out->flat<bool>().data());
  }

 private:
  bool magnitude_ = true;
};

REGISTER_KERNEL_BUILDER(Name("FtSelectSmallest").Device(DEVICE_CPU),
                        FtSelectSmallestOp);
REGISTER_KERNEL_BUILDER(Name("FtSelectByKeys").Device(DEVICE_CPU),
                        FtSelectByKeysOp);

// ------------------------------------------------- the masked SGD updates

REGISTER_OP("FtMaskedApplyMomentum")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("lr: T")
    .Input("grad: T")
    .Input("mask: bool")
    .Input("momentum: T")
    .Attr("T: {float, double}")
    .Attr("use_nesterov: bool = false")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->input(3), c->input(4), &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
      return c->WithRank(c->input(5), 0, &unused);
    });

REGISTER_OP("FtMaskedApplyGradientDescent")
    .Input("var: resource")
    .Input("alpha: T")
    .Input("grad: T")
    .Input("mask: bool")
    .Attr("T: {float, double}")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->input(2), c->input(3), &unused));
      return c->WithRank(c->input(1), 0, &unused);
    });

typedef Eigen::ThreadPoolDevice CPUDevice;

// The update of entries [begin, end). The gradient is loaded whether or not
// the entry is masked, so that the select is a blend the compiler
// vectorizes (a branch on a random mask is mispredicted often, and took
// twice as long as TensorFlow's two ops).
template <typename T, bool kMomentum, bool kNesterov>
void MaskedUpdate(T* __restrict var, T* __restrict accum,
                  const T* __restrict grad, const uint8_t* __restrict mask,
                  T lr, T momentum, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const T loaded = grad[i];
    const T g = mask[i] ? loaded : T(0);
    if (!kMomentum) {
      var[i] = var[i] - g * lr;  // ApplyGradientDescent: var -= grad * lr
      continue;
    }
    // ApplyKerasMomentum: accum = accum * momentum - grad * lr, then
    // var += accum, or with Nesterov var += accum * momentum - grad * lr.
    const T a = accum[i] * momentum - g * lr;
    accum[i] = a;
    var[i] = kNesterov ? var[i] + (a * momentum - g * lr) : var[i] + a;
  }
}

template <typename T, bool kMomentum>
class FtMaskedApplyOp : public OpKernel {
 public:
  explicit FtMaskedApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    if (kMomentum) OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    // Inputs: var, [accum], lr, grad, mask, [momentum].
    const int lr_at = kMomentum ? 2 : 1;
    std::vector<int> variables = {0};
    if (kMomentum) variables.push_back(1);
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, T>(
        ctx, false, false, variables);
    Tensor var, accum;
    OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, T>(
                            ctx, 0, false, false, &var));
    if (kMomentum) {
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, T>(
                              ctx, 1, false, false, &accum));
    }
    const Tensor& lr = ctx->input(lr_at);
    const Tensor& grad = ctx->input(lr_at + 1);
    const Tensor& mask = ctx->input(lr_at + 2);
    OP_REQUIRES(ctx, var.IsInitialized(),
                errors::FailedPrecondition("var is not initialized"));
    OP_REQUIRES(ctx, !kMomentum || accum.IsInitialized(),
                errors::FailedPrecondition("accum is not initialized"));
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(lr.shape()),
                errors::InvalidArgument("lr must be a scalar; got shape ",
                                        lr.shape().DebugString()));
    OP_REQUIRES(ctx, grad.shape() == var.shape(),
                errors::InvalidArgument("grad must have the shape of var, ",
                                        var.shape().DebugString(), "; got ",
                                        grad.shape().DebugString()));
    OP_REQUIRES(ctx, mask.shape() == var.shape(),
                errors::InvalidArgument("mask must have the shape of var, ",
                                        var.shape().DebugString(), "; got ",
                                        mask.shape().DebugString()));
    T momentum = T(0);
    if (kMomentum) {
      OP_REQUIRES(ctx, accum.shape() == var.shape(),
                  errors::InvalidArgument(
                      "accum must have the shape of var, ",
                      var.shape().DebugString(), "; got ",
                      accum.shape().DebugString()));
      const Tensor& m = ctx->input(5);
      OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(m.shape()),
                  errors::InvalidArgument("momentum must be a scalar; got "
                                          "shape ", m.shape().DebugString()));
      momentum = m.scalar<T>()();
    }
    T* v = var.flat<T>().data();
    T* a = kMomentum ? accum.flat<T>().data() : nullptr;
    const T* g = grad.flat<T>().data();
    const uint8_t* flags =
        reinterpret_cast<const uint8_t*>(mask.flat<bool>().data());
    const T rate = lr.scalar<T>()();
    const bool nesterov = nesterov_;
    auto work = [=](int64_t begin, int64_t end) {
      if (!kMomentum) {
        MaskedUpdate<T, false, false>(v, a, g, flags, rate, momentum, begin, end);
      } else if (nesterov) {
        MaskedUpdate<T, true, true>(v, a, g, flags, rate, momentum, begin, end);
      } else {
        MaskedUpdate<T, true, false>(v, a, g, flags, rate, momentum, begin, end);
      }
    };
    // Elementwise, so the split never changes a result.
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    Shard(pool->num_threads, pool->workers, var.NumElements(), 4, work);
  }

 private:
  bool nesterov_ = false;
};

#define FT_REGISTER_MASKED(T)                                        \
  REGISTER_KERNEL_BUILDER(Name("FtMaskedApplyMomentum")              \
                              .Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T"),               \
                          FtMaskedApplyOp<T, true>);                 \
  REGISTER_KERNEL_BUILDER(Name("FtMaskedApplyGradientDescent")       \
                              .Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T"),               \
                          FtMaskedApplyOp<T, false>);
FT_REGISTER_MASKED(float)
FT_REGISTER_MASKED(double)
#undef FT_REGISTER_MASKED

}  // namespace ft_select
