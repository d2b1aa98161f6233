// clipcore's global norm and clip_by_global_norm as TensorFlow ops.
//
// clipcore._tf_ops compiles this file against the installed TensorFlow the
// first time graph mode needs it (tf.load_op_library), so it ships inside the
// package. The ops hold no numerics of their own: they gather their tensors'
// memory into the layouts of clipcore's C-level API (clipcore/kernels.pxd)
// and call its kernels, whose addresses clipcore_tf_bind receives from the
// kernels module's capsules. The structs below mirror kernels.pxd's.

#include <cmath>
#include <cstddef>
#include <vector>

#include "tensorflow/core/framework/allocation_description.pb.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/denormal.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::errors::InvalidArgument;
using tensorflow::errors::FailedPrecondition;
using tensorflow::shape_inference::InferenceContext;

enum { SEG_F32 = 0, SEG_F64 = 1 };

struct Segment {
  char *data;
  std::ptrdiff_t n;
  std::ptrdiff_t stride;
  int kind;
};

struct Layout {
  Segment *segs;
  std::ptrdiff_t *starts;
  std::ptrdiff_t n_segs;
  std::ptrdiff_t n_total;
};

struct Pair {
  const char *src;
  char *dst;
  std::ptrdiff_t n;
  int f64;
};

typedef double (*layout_norm_fn)(const Layout *, double, int);
typedef void (*scale_into_fn)(const Pair *, const std::ptrdiff_t *, std::ptrdiff_t, float, double, int);

layout_norm_fn layout_norm = nullptr;
scale_into_fn scale_into = nullptr;

template <typename T> constexpr int seg_kind() { return sizeof(T) == 8 ? SEG_F64 : SEG_F32; }

// The non-empty inputs [0, n) as one layout (the core's order, so its bits).
template <typename T>
struct Inputs {
  std::vector<Segment> segs;
  std::vector<std::ptrdiff_t> starts;
  Layout lay{};

  Inputs(OpKernelContext *ctx, int n) {
    std::ptrdiff_t total = 0;
    segs.reserve(n);
    starts.reserve(n);
    for (int i = 0; i < n; ++i) {
      const Tensor &t = ctx->input(i);
      if (t.NumElements() == 0) continue;
      // The kernels write only through an output; an input is only read.
      segs.push_back({const_cast<char *>(t.tensor_data().data()),
                      static_cast<std::ptrdiff_t>(t.NumElements()), 1, seg_kind<T>()});
      starts.push_back(total);
      total += t.NumElements();
    }
    lay = {segs.data(), starts.data(), static_cast<std::ptrdiff_t>(segs.size()), total};
  }
};

bool bound(OpKernelContext *ctx) {
  if (layout_norm && scale_into) return true;
  ctx->CtxFailure(__FILE__, __LINE__, FailedPrecondition(
      "clipcore's TensorFlow ops were loaded without clipcore's kernels "
      "(load them with clipcore._tf_ops.load())"));
  return false;
}

// TensorFlow's factor, in T as TF computes it: clip_norm * min(1 / norm,
// 1 / clip_norm) + (norm - norm), so that a NaN or infinite norm gives NaN.
template <typename T>
T tf_scale(T norm, T clip_norm) {
  const T one = T(1), a = one / norm, b = one / clip_norm;
  const T lo = std::isnan(a) ? a : std::isnan(b) ? b : (a < b ? a : b);
  return clip_norm * lo + (norm - norm);
}

// Both ops: N tensors, then their scalar argument; the kernels' n_threads.
// TensorFlow runs its kernels with subnormals flushed to zero; these compute
// with IEEE subnormals, as the eager functions do, for the same bits.
class ListOp : public OpKernel {
 public:
  explicit ListOp(OpKernelConstruction *c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("N", &n_));
    OP_REQUIRES_OK(c, c->GetAttr("n_threads", &n_threads_));
  }

 protected:
  // The scalar after the N tensors; nullptr (ctx failed) if it is not one or
  // the kernels are not bound.
  const Tensor *scalar_arg(OpKernelContext *ctx, const char *name) const {
    if (!bound(ctx)) return nullptr;
    const Tensor &t = ctx->input(n_);
    if (t.dims() == 0) return &t;
    ctx->CtxFailure(__FILE__, __LINE__, InvalidArgument(
        name, " must be a scalar, got shape ", t.shape().DebugString()));
    return nullptr;
  }

  int n_ = 0, n_threads_ = 0;
};

template <typename T>
class GlobalNormOp : public ListOp {
 public:
  using ListOp::ListOp;

  void Compute(OpKernelContext *ctx) override {
    tensorflow::port::ScopedDontFlushDenormal ieee;   // see ListOp
    const Tensor *p = scalar_arg(ctx, "norm_type");
    if (!p) return;
    const double norm_type = p->scalar<double>()();
    OP_REQUIRES(ctx, norm_type > 0, InvalidArgument(
        "norm_type must be > 0 (inf for the max norm), got ", norm_type));
    Inputs<T> in(ctx, n_);
    const double norm = layout_norm(&in.lay, norm_type, n_threads_);
    Tensor *out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {}, &out));
    out->scalar<T>()() = static_cast<T>(norm);
  }
};

// The size from which an output that is not an input taken over gets an
// allocation of its own: there the allocation costs little next to the
// scaling, and no small output that outlives the others keeps it alive.
constexpr std::ptrdiff_t kOwnOutputBytes = 256 * 1024;

// The small outputs share one allocation (one allocation, not one per
// output), each slice aligned as TensorFlow aligns its buffers. A slice is a
// buffer of its own that holds the block (a Share), not a Tensor::Slice: a
// Tensor::Slice never owns its memory, so the op that takes it next (another
// clip, an optimizer's update) could not take it over in place.
class Block : public tensorflow::core::RefCounted {
 public:
  Tensor memory;
};

class Share : public tensorflow::TensorBuffer {
 public:
  Share(Block *block, char *data, std::size_t bytes)
      : TensorBuffer(data), block_(block), bytes_(bytes) { block_->Ref(); }
  ~Share() override { block_->Unref(); }
  std::size_t size() const override { return bytes_; }
  TensorBuffer *root_buffer() override { return this; }
  void FillAllocationDescription(tensorflow::AllocationDescription *proto) const override {
    proto->set_requested_bytes(bytes_);
    proto->set_allocator_name("clipcore");
  }

 private:
  Block *const block_;
  const std::size_t bytes_;
};

// An input that only this op holds (reference count one) may be scaled in
// place and become its output: TensorFlow's forward_input makes the same
// checks (and those of ScopedAllocator reservations, which grappler makes for
// collective ops only), at a cost that exceeds the scaling of a small tensor.
bool can_take_over(OpKernelContext *ctx, int i) {
  return ctx->input(i).RefCountIsOne() &&
         ctx->output_alloc_attr(i).IsEqualOrLessRestrictiveThan(ctx->input_alloc_attr(i));
}

template <typename T>
class ClipByGlobalNormOp : public ListOp {
 public:
  using ListOp::ListOp;

  void Compute(OpKernelContext *ctx) override {
    tensorflow::port::ScopedDontFlushDenormal ieee;   // see ListOp
    const Tensor *c = scalar_arg(ctx, "clip_norm");
    if (!c) return;
    Inputs<T> in(ctx, n_);
    const T norm = static_cast<T>(layout_norm(&in.lay, 2.0, n_threads_));
    const T scale = tf_scale(norm, c->scalar<T>()());
    Tensor *norm_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(n_, {}, &norm_out));
    norm_out->scalar<T>()() = norm;
    if (scale == T(1)) {            // nothing changes: the inputs are the outputs
      for (int i = 0; i < n_; ++i) ctx->set_output(i, ctx->input(i));
      return;
    }
    // An input nothing else holds becomes its output, scaled in place (a pair
    // with dst == src); the others are scaled into slices of one new block.
    // Every output is in place before one scaling pass writes any.
    constexpr std::ptrdiff_t align = EIGEN_MAX_ALIGN_BYTES / sizeof(T);
    std::vector<Pair> pairs;
    std::vector<std::ptrdiff_t> starts, fresh, offsets;
    std::ptrdiff_t total = 0, block_total = 0;
    pairs.reserve(n_);
    starts.reserve(n_);
    auto push = [&](const char *src, char *dst, std::ptrdiff_t len) {
      pairs.push_back({src, dst, len, sizeof(T) == 8});
      starts.push_back(total);
      total += len;
    };
    for (int i = 0; i < n_; ++i) {
      const Tensor &t = ctx->input(i);
      const std::ptrdiff_t len = t.NumElements();
      if (len == 0) {
        ctx->set_output(i, t);
      } else if (can_take_over(ctx, i)) {
        char *data = const_cast<char *>(t.tensor_data().data());
        push(data, data, len);
        ctx->set_output(i, t);
      } else if (len * static_cast<std::ptrdiff_t>(sizeof(T)) >= kOwnOutputBytes) {
        Tensor *out = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(i, t.shape(), &out));
        push(t.tensor_data().data(), const_cast<char *>(out->tensor_data().data()), len);
      } else {
        fresh.push_back(i);
        offsets.push_back(block_total);
        block_total += (len + align - 1) / align * align;
      }
    }
    if (!fresh.empty()) {
      tensorflow::core::RefCountPtr<Block> block(new Block);
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::v(),
                                             tensorflow::TensorShape({block_total}),
                                             &block->memory));
      T *base = block->memory.flat<T>().data();
      for (std::size_t k = 0; k < fresh.size(); ++k) {
        const Tensor &t = ctx->input(fresh[k]);
        const std::ptrdiff_t len = t.NumElements();
        char *dst = reinterpret_cast<char *>(base + offsets[k]);
        Share *share = new Share(block.get(), dst, len * sizeof(T));
        ctx->set_output(fresh[k], Tensor(t.dtype(), t.shape(), share));
        share->Unref();               // the output holds it now
        push(t.tensor_data().data(), dst, len);
      }
    }
    scale_into(pairs.data(), starts.data(), static_cast<std::ptrdiff_t>(pairs.size()),
               static_cast<float>(scale), static_cast<double>(scale), n_threads_);
  }
};

}  // namespace

REGISTER_OP("ClipcoreGlobalNorm")
    .Input("t_list: N * T")
    .Input("norm_type: float64")
    .Output("global_norm: T")
    .Attr("N: int >= 1")
    .Attr("T: {float, double}")
    .Attr("n_threads: int = 0")
    .SetShapeFn([](InferenceContext *c) {
      c->set_output(0, c->Scalar());
      return tensorflow::OkStatus();
    });

REGISTER_OP("ClipcoreClipByGlobalNorm")
    .Input("t_list: N * T")
    .Input("clip_norm: T")
    .Output("list_clipped: N * T")
    .Output("global_norm: T")
    .Attr("N: int >= 1")
    .Attr("T: {float, double}")
    .Attr("n_threads: int = 0")
    .SetShapeFn([](InferenceContext *c) {
      int n = c->num_inputs() - 1;
      tensorflow::shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(n), 0, &unused));
      for (int i = 0; i < n; ++i) c->set_output(i, c->input(i));
      c->set_output(n, c->Scalar());
      return tensorflow::OkStatus();
    });

#define CLIPCORE_KERNELS(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("ClipcoreGlobalNorm").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
      GlobalNormOp<T>);                                                              \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("ClipcoreClipByGlobalNorm").Device(DEVICE_CPU).TypeConstraint<T>("T"),    \
      ClipByGlobalNormOp<T>);
CLIPCORE_KERNELS(float)
CLIPCORE_KERNELS(double)

// clipcore._tf_ops passes the kernels' addresses (from their capsules) once.
extern "C" void clipcore_tf_bind(void *norm, void *into) {
  scale_into = reinterpret_cast<scale_into_fn>(into);
  layout_norm = reinterpret_cast<layout_norm_fn>(norm);
}
