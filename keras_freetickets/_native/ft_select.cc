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
// by increasing index until k are flagged. Built by
// keras_freetickets/native.py.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

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

inline uint32_t Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// masking._magnitude_keys: |w|'s bits + 2**23 (wrapping), at least
// 2**24 - 1 as int32.
struct MagnitudeKey {
  const float* values;
  const bool* eligible;
  int32_t operator()(int64_t i) const {
    if (!eligible[i]) return kMinimum;
    const uint32_t shifted = (Bits(values[i]) & 0x7FFFFFFFu) + (1u << 23);
    return std::max(static_cast<int32_t>(shifted), (1 << 24) - 1);
  }
};

// masking._descending_keys: 0x7F7FFFFF - bits (wrapping), at most
// 0x7F000000 as uint32.
struct DescendingKey {
  const float* values;
  const bool* eligible;
  int32_t operator()(int64_t i) const {
    if (!eligible[i]) return kMinimum;
    const uint32_t flipped = 0x7F7FFFFFu - Bits(values[i]);
    return static_cast<int32_t>(std::min(flipped, 0x7F000000u));
  }
};

struct GivenKey {
  const int32_t* keys;
  int32_t operator()(int64_t i) const { return keys[i]; }
};

template <typename Key>
void Select(const Key& key, int64_t n, int64_t k, bool after_minimum,
            bool* flags) {
  if (n == 0) return;
  // Four histograms, summed after: consecutive keys often share a bucket
  // (the minimum's), and one count's increments would wait on each other.
  std::vector<int64_t> part(4 * kBuckets, 0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++part[TopDigit(key(i))];
    ++part[kBuckets + TopDigit(key(i + 1))];
    ++part[2 * kBuckets + TopDigit(key(i + 2))];
    ++part[3 * kBuckets + TopDigit(key(i + 3))];
  }
  for (; i < n; ++i) ++part[TopDigit(key(i))];
  std::vector<int64_t> counts(kBuckets);
  for (int b = 0; b < kBuckets; ++b) {
    counts[b] = part[b] + part[kBuckets + b] + part[2 * kBuckets + b] +
                part[3 * kBuckets + b];
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
  std::vector<int32_t> in_bucket;
  in_bucket.reserve(counts[bucket]);
  for (i = 0; i < n; ++i) {
    const int32_t value = key(i);
    if (TopDigit(value) == bucket) in_bucket.push_back(value);
  }
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
    for (i = 0; i < n; ++i) flags[i] = key(i) <= threshold;
    return;
  }
  for (i = 0; i < n; ++i) {
    const int32_t value = key(i);
    bool take = value < threshold;
    if (value == threshold && ties_wanted > 0) {
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
    Select(GivenKey{keys.flat<int32>().data()}, keys.NumElements(),
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
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, values.shape(), &out));
    const float* v = values.flat<float>().data();
    const bool* eligible = ctx->input(1).flat<bool>().data();
    const int64_t k = ctx->input(2).scalar<int32>()();
    bool* flags = out->flat<bool>().data();
    if (magnitude_) {
      Select(MagnitudeKey{v, eligible}, values.NumElements(), k, true, flags);
    } else {
      Select(DescendingKey{v, eligible}, values.NumElements(), k, true, flags);
    }
  }

 private:
  bool magnitude_ = true;
};

REGISTER_KERNEL_BUILDER(Name("FtSelectSmallest").Device(DEVICE_CPU),
                        FtSelectSmallestOp);
REGISTER_KERNEL_BUILDER(Name("FtSelectByKeys").Device(DEVICE_CPU),
                        FtSelectByKeysOp);

}  // namespace ft_select
