// Native CPU kernels for the activation cache of scaled activation pruning (fedmef_tf/sap.py).
//
// FedmefSapCompress(x, k) -> (values, packed)
//   Keeps the k entries of x with the largest |x| (ties at a nonzero threshold: smallest flat
//   index first; at a zero threshold only the nonzero entries), exactly as the pure-TensorFlow
//   path of sap.py: values = kept entries in flat order (float32), packed = 1-bit keep mask,
//   element i in bit i % 8 of byte i / 8.
// FedmefSapDecompress(values, packed, shape) -> x_pruned
//   Dense tensor of `shape` with the kept values at their positions and zeros elsewhere.
//
// Why native: the same work in TensorFlow ops is about ten elementwise passes plus two `Where`
// (a serial scan that materialises int64 indices); here it is three passes forward (two radix
// histograms of the float bit patterns, a write) and two backward (a popcount, a
// write), each split over the intra-op thread pool, with no index tensor. Temporary memory
// (per-block histograms) is taken from the TensorFlow allocator so that the allocator's peak,
// which is how fedmef_tf.memory measures a training step, sees it.
//
// Built by `python -m fedmef_tf.sap_native` (scripts/install.sh runs it); sap.py falls back to
// its TensorFlow ops when the library is missing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace fedmef {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::DT_INT32;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using int64 = std::int64_t;

constexpr int kBins = 1 << 16;
constexpr int kStride = kBins + 8;  // a histogram and 8 spare bins

// lanes[b][j] = ~0u if bit j of byte b is set, else 0: one 16-byte-aligned row per byte value.
struct ByteMasks {
  alignas(16) uint32_t lanes[256][8];
  ByteMasks() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) lanes[b][j] = ((b >> j) & 1) ? ~0u : 0u;
  }
  static const ByteMasks& Get() {
    static const ByteMasks* const masks = new ByteMasks();
    return *masks;
  }
};

inline uint32_t AbsBits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}

// Contiguous blocks of the flat tensor, each a multiple of 8 elements long (one packed byte
// never straddles two blocks), at most one per thread of the intra-op pool.
struct Blocks {
  int64 n = 0, count = 1, len = 8;
  int64 Begin(int64 b) const { return std::min(n, b * len); }
  int64 End(int64 b) const { return std::min(n, (b + 1) * len); }
};

Blocks MakeBlocks(OpKernelContext* ctx, int64 n) {
  const int threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
  Blocks blocks;
  blocks.n = n;
  int64 want = std::max<int64>(1, std::min<int64>(threads, n >> 16));  // >= 64K elements each
  blocks.len = std::max<int64>(8, ((n + want - 1) / want + 7) / 8 * 8);
  blocks.count = std::max<int64>(1, (n + blocks.len - 1) / blocks.len);
  return blocks;
}

void ForEachBlock(OpKernelContext* ctx, const Blocks& blocks, const std::function<void(int64)>& fn) {
  if (blocks.count == 1) {
    fn(0);
    return;
  }
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  // A huge cost per unit makes Shard give every block its own task.
  ::tensorflow::Shard(workers->num_threads, workers->workers, blocks.count, int64{1} << 40,
                      [&](int64 start, int64 limit) {
                        for (int64 b = start; b < limit; ++b) fn(b);
                      });
}

// Largest bin b with #(entries in bins >= b) >= need; *above = #(entries in bins > b).
int SelectFromTop(const std::vector<int64>& hist, int64 need, int64* above) {
  int64 cum = 0;
  for (int bin = static_cast<int>(hist.size()) - 1; bin > 0; --bin) {
    if (cum + hist[bin] >= need) {
      *above = cum;
      return bin;
    }
    cum += hist[bin];
  }
  *above = cum;
  return 0;
}

class SapCompressOp : public OpKernel {
 public:
  explicit SapCompressOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const Tensor& k_t = ctx->input(1);
    OP_REQUIRES(ctx, TensorShapeUtils_IsScalar(k_t), InvalidArgument("k must be a scalar"));
    const int64 n = x_t.NumElements();
    const int64 k = k_t.scalar<int64>()();
    OP_REQUIRES(ctx, k >= 0 && k <= n,
                InvalidArgument("k must be in [0, numel(x)] = [0, ", n, "], got ", k));
    const float* x = x_t.flat<float>().data();
    const int64 nbytes = (n + 7) / 8;
    Tensor* packed_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({nbytes}), &packed_t));
    uint8_t* packed = packed_t->flat<uint8_t>().data();
    Tensor* values_t = nullptr;
    if (k == 0) {
      std::memset(packed, 0, nbytes);
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({0}), &values_t));
      return;
    }
    const Blocks blocks = MakeBlocks(ctx, n);
    // Per block: the histogram of pass 1 and that of pass 2, kept until the end: the
    // per-block counts that place each block's output come from them.
    Tensor hist_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_INT32, TensorShape({blocks.count, 2, kStride}),
                                           &hist_t));
    int32_t* hist = hist_t.flat<int32_t>().data();
    auto hist_hi = [&](int64 b) { return hist + (b * 2) * kStride; };
    auto hist_lo = [&](int64 b) { return hist + (b * 2 + 1) * kStride; };

    // Histogram of bin(|x| bits, j) over one block, j = position in a group of 8. An entry
    // that should not be counted goes to a spare bin that depends on j, so that runs of such
    // entries do not form a chain of dependent updates of one counter (branch-free).
    auto block_histogram = [&](int32_t* h, int64 b, auto bin) {
      std::memset(h, 0, sizeof(int32_t) * kStride);
      int64 i = blocks.Begin(b);
      const int64 e = blocks.End(b);
      for (; i + 8 <= e; i += 8)
        for (uint32_t j = 0; j < 8; ++j) ++h[bin(AbsBits(x[i + j]), j)];
      for (; i < e; ++i) ++h[bin(AbsBits(x[i]), 0)];
    };
    std::vector<int64> total;
    auto sum_blocks = [&](auto hist_of, int bins) {
      total.assign(bins, 0);
      for (int64 b = 0; b < blocks.count; ++b) {
        const int32_t* h = hist_of(b);
        for (int bin = 0; bin < bins; ++bin) total[bin] += h[bin];
      }
    };

    // Pass 1: histogram of the high 16 bits of |x| (bit 31 is clear: bins 0..32767). Zeros
    // (half of a ReLU output) would all increment bin 0 one after the other; they count in the
    // spare bins 32768 + j, folded into bin 0 afterwards.
    ForEachBlock(ctx, blocks, [&](int64 b) {
      int32_t* h = hist_hi(b);
      block_histogram(h, b, [](uint32_t bits, uint32_t j) {
        return (bits >> 16) | ((0u - static_cast<uint32_t>(bits == 0)) & (32768u + j));
      });
      for (int j = 0; j < 8; ++j) {
        h[0] += h[32768 + j];
        h[32768 + j] = 0;
      }
    });
    sum_blocks(hist_hi, kBins / 2);  // SelectFromTop scans the used bins only
    int64 above_hi = 0;
    const uint32_t hi = static_cast<uint32_t>(SelectFromTop(total, k, &above_hi));

    // Pass 2: histogram of the low 16 bits of the entries in the selected high bin; the other
    // entries count in the spare bins kBins + j, which are ignored.
    ForEachBlock(ctx, blocks, [&](int64 b) {
      block_histogram(hist_lo(b), b, [hi](uint32_t bits, uint32_t j) {
        const uint32_t match = 0u - static_cast<uint32_t>((bits >> 16) == hi);
        return (bits & 0xffffu & match) | (~match & (kBins + j));
      });
    });
    sum_blocks(hist_lo, kBins);
    int64 above_lo = 0;
    const uint32_t lo = static_cast<uint32_t>(SelectFromTop(total, k - above_hi, &above_lo));
    const uint32_t t = (hi << 16) | lo;
    const int64 n_gt = above_hi + above_lo;
    // Entries equal to t that are kept: none at t == 0 (zeros carry nothing), else k - n_gt.
    const int64 ties = t == 0 ? 0 : k - n_gt;

    // Per block, entries above t and entries equal to t, read off the block's histograms.
    std::vector<int64> offset(blocks.count + 1, 0), quota(blocks.count, 0),
        n_equal(blocks.count, 0);
    int64 ties_left = ties;
    for (int64 b = 0; b < blocks.count; ++b) {
      int64 above = 0;
      const int32_t* h1 = hist_hi(b);
      for (int bin = static_cast<int>(hi) + 1; bin < kBins / 2; ++bin) above += h1[bin];
      const int32_t* h2 = hist_lo(b);
      for (int bin = static_cast<int>(lo) + 1; bin < kBins; ++bin) above += h2[bin];
      const int64 equal = h2[lo];
      n_equal[b] = equal;
      quota[b] = std::min(ties_left, equal);
      ties_left -= quota[b];
      offset[b + 1] = offset[b] + above + quota[b];
    }
    const int64 kept = offset[blocks.count];
    OP_REQUIRES(ctx, kept == n_gt + ties,
                ::tensorflow::errors::Internal("SAP selection miscounted: ", kept, " kept, ",
                                               n_gt + ties, " selected"));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kept}), &values_t));
    float* values = values_t->flat<float>().data();

    // Pass 4: write the kept values and the packed mask. A block that keeps none or all of
    // its entries equal to t keeps exactly the entries with |x| bits >= thr (thr = t + 1 or
    // t): one comparison per entry. Only the block where the ties run out counts them.
    ForEachBlock(ctx, blocks, [&](int64 b) {
      int64 off = offset[b];
      const int64 stop = offset[b + 1];
      const int64 begin = blocks.Begin(b), end = blocks.End(b);
      if (quota[b] == 0 || quota[b] == n_equal[b]) {
        const uint32_t thr = quota[b] == 0 ? t + 1 : t;  // t < 2^31 - 1: |x| is finite
        for (int64 i0 = begin; i0 < end; i0 += 8) {
          const int64 i1 = std::min(end, i0 + 8);
          uint32_t byte = 0;
          if (off + 8 <= stop && i1 - i0 == 8) {
            // Branch-free: always store, advance only on a kept entry (the slot is then
            // overwritten by the next kept value; 8 free slots remain, nothing is clobbered).
            for (int j = 0; j < 8; ++j) {
              const float v = x[i0 + j];
              const uint32_t keep = AbsBits(v) >= thr;
              values[off] = v;
              off += keep;
              byte |= keep << j;
            }
          } else {
            for (int64 i = i0; i < i1; ++i) {
              const float v = x[i];
              const uint32_t keep = AbsBits(v) >= thr;
              if (keep) values[off++] = v;
              byte |= keep << (i - i0);
            }
          }
          packed[i0 / 8] = static_cast<uint8_t>(byte);
        }
        return;
      }
      int64 q = quota[b];
      for (int64 i0 = begin; i0 < end; i0 += 8) {
        const int64 i1 = std::min(end, i0 + 8);
        uint32_t byte = 0;
        for (int64 i = i0; i < i1; ++i) {
          const float v = x[i];
          const uint32_t bits = AbsBits(v);
          uint32_t keep = bits > t;
          if (bits == t && q > 0) {
            --q;
            keep = 1;
          }
          if (keep) values[off++] = v;
          byte |= keep << (i - i0);
        }
        packed[i0 / 8] = static_cast<uint8_t>(byte);
      }
    });
  }

 private:
  static bool TensorShapeUtils_IsScalar(const Tensor& t) { return t.dims() == 0; }
};

class SapDecompressOp : public OpKernel {
 public:
  explicit SapDecompressOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values_t = ctx->input(0);
    const Tensor& packed_t = ctx->input(1);
    const Tensor& shape_t = ctx->input(2);
    OP_REQUIRES(ctx, values_t.dims() == 1 && packed_t.dims() == 1 && shape_t.dims() == 1,
                InvalidArgument("values, packed and shape must be 1-D"));
    TensorShape shape;
    OP_REQUIRES_OK(ctx, ::tensorflow::TensorShapeUtils::MakeShape(shape_t.vec<int32_t>(), &shape));
    const int64 n = shape.num_elements();
    const int64 nbytes = (n + 7) / 8;
    OP_REQUIRES(ctx, packed_t.NumElements() == nbytes,
                InvalidArgument("packed has ", packed_t.NumElements(), " bytes, shape needs ",
                                nbytes));
    const float* values = values_t.flat<float>().data();
    const uint8_t* packed = packed_t.flat<uint8_t>().data();
    const int64 m = values_t.NumElements();
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out_t));
    float* out = out_t->flat<float>().data();
    if (n == 0) return;
    const Blocks blocks = MakeBlocks(ctx, n);
    std::vector<int64> offset(blocks.count + 1, 0);
    ForEachBlock(ctx, blocks, [&](int64 b) {
      int64 c = 0;
      for (int64 byte = blocks.Begin(b) / 8, e = (blocks.End(b) + 7) / 8; byte < e; ++byte)
        c += __builtin_popcount(packed[byte]);
      offset[b + 1] = c;
    });
    for (int64 b = 0; b < blocks.count; ++b) offset[b + 1] += offset[b];
    OP_REQUIRES(ctx, offset[blocks.count] == m,
                InvalidArgument("the mask keeps ", offset[blocks.count], " entries, values has ",
                                m));
    ForEachBlock(ctx, blocks, [&](int64 b) {
      int64 off = offset[b];
      const int64 begin = blocks.Begin(b), end = blocks.End(b);
      for (int64 i0 = begin; i0 < end; i0 += 8) {
        const uint32_t byte = packed[i0 / 8];
        const int64 i1 = std::min(end, i0 + 8);
        if (byte == 0) {
          std::fill(out + i0, out + i1, 0.0f);
        } else if (off + 8 <= m && i1 - i0 == 8) {
          // Branch-free (a branch on random bits mispredicts): the next value's bits are
          // ANDed with 0 or ~0, which gives +0.0f for a dropped entry.
          for (int j = 0; j < 8; ++j) {
            const uint32_t bit = (byte >> j) & 1u;
            uint32_t v;
            std::memcpy(&v, values + off, sizeof(v));
            v &= 0u - bit;
            std::memcpy(out + i0 + j, &v, sizeof(v));
            off += bit;
          }
        } else {
          for (int64 i = i0; i < i1; ++i) {
            if ((byte >> (i - i0)) & 1u) {
              out[i] = values[off++];
            } else {
              out[i] = 0.0f;
            }
          }
        }
      }
    });
  }
};

// y = min(max(x, 0), cap) (cap = +inf for ReLU) and the packed 1-bit mask of 0 < x < cap.
class BitActivationOp : public OpKernel {
 public:
  explicit BitActivationOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cap", &cap_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    const int64 n = x_t.NumElements();
    Tensor* y_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x_t.shape(), &y_t));
    Tensor* packed_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({(n + 7) / 8}), &packed_t));
    const float* x = x_t.flat<float>().data();
    float* y = y_t->flat<float>().data();
    uint8_t* packed = packed_t->flat<uint8_t>().data();
    if (n == 0) return;
    const float cap = cap_ > 0.0f ? cap_ : std::numeric_limits<float>::infinity();
    const Blocks blocks = MakeBlocks(ctx, n);
    ForEachBlock(ctx, blocks, [&](int64 b) {
      const int64 begin = blocks.Begin(b), end = blocks.End(b);
      // Branch-free (bit masks, a min instruction and flag arithmetic): a branch on the sign
      // of centred activations mispredicts half of the time (10x slower, measured). x is read
      // before y is written (y may share x's buffer); NaN stays NaN.
      auto one = [cap](float v, uint32_t* pass) {
        *pass = static_cast<uint32_t>(v > 0.0f) & static_cast<uint32_t>(v < cap);
        // max(v, 0) on the bits (GCC turns std::max on floats into a branch): clear an
        // entry whose sign bit is set unless it is a NaN.
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof(bits));
        const uint32_t negative = 0u - (bits >> 31);
        const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7fffffffu) > 0x7f800000u);
        bits &= ~(negative & ~nan);
        float r;
        std::memcpy(&r, &bits, sizeof(r));
        return std::min(r, cap);
      };
      int64 i0 = begin;
#ifdef __SSE2__
      // 4 lanes at a time; max(0, v) and min(cap, r) return v / r when it is a NaN.
      const __m128 zero = _mm_setzero_ps(), vcap = _mm_set1_ps(cap);
      for (; i0 + 8 <= end; i0 += 8) {
        const __m128 a = _mm_loadu_ps(x + i0), b = _mm_loadu_ps(x + i0 + 4);
        const int lo = _mm_movemask_ps(_mm_and_ps(_mm_cmpgt_ps(a, zero), _mm_cmplt_ps(a, vcap)));
        const int hi = _mm_movemask_ps(_mm_and_ps(_mm_cmpgt_ps(b, zero), _mm_cmplt_ps(b, vcap)));
        _mm_storeu_ps(y + i0, _mm_min_ps(vcap, _mm_max_ps(zero, a)));
        _mm_storeu_ps(y + i0 + 4, _mm_min_ps(vcap, _mm_max_ps(zero, b)));
        packed[i0 / 8] = static_cast<uint8_t>(lo | (hi << 4));
      }
#endif
      for (; i0 + 8 <= end; i0 += 8) {
        uint32_t byte = 0;
        for (int j = 0; j < 8; ++j) {
          uint32_t pass;
          y[i0 + j] = one(x[i0 + j], &pass);
          byte |= pass << j;
        }
        packed[i0 / 8] = static_cast<uint8_t>(byte);
      }
      if (i0 < end) {
        uint32_t byte = 0;
        for (int64 i = i0; i < end; ++i) {
          uint32_t pass;
          y[i] = one(x[i], &pass);
          byte |= pass << (i - i0);
        }
        packed[i0 / 8] = static_cast<uint8_t>(byte);
      }
    });
  }

 private:
  float cap_;
};

// dx = dy where the packed mask is set, else 0.
class BitActivationGradOp : public OpKernel {
 public:
  explicit BitActivationGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy_t = ctx->input(0);
    const Tensor& packed_t = ctx->input(1);
    const int64 n = dy_t.NumElements();
    OP_REQUIRES(ctx, packed_t.dims() == 1 && packed_t.NumElements() == (n + 7) / 8,
                InvalidArgument("packed has ", packed_t.NumElements(), " bytes, dy needs ",
                                (n + 7) / 8));
    Tensor* dx_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, dy_t.shape(), &dx_t));
    const float* dy = dy_t.flat<float>().data();
    const uint8_t* packed = packed_t.flat<uint8_t>().data();
    float* dx = dx_t->flat<float>().data();
    if (n == 0) return;
    const Blocks blocks = MakeBlocks(ctx, n);
    ForEachBlock(ctx, blocks, [&](int64 b) {
      const int64 begin = blocks.Begin(b), end = blocks.End(b);
      int64 i0 = begin;
#ifdef __SSE2__
      const ByteMasks& masks = ByteMasks::Get();
      for (; i0 + 8 <= end; i0 += 8) {
        const uint32_t* m = masks.lanes[packed[i0 >> 3]];
        const __m128 a = _mm_loadu_ps(dy + i0), b = _mm_loadu_ps(dy + i0 + 4);
        _mm_storeu_ps(dx + i0, _mm_and_ps(a, _mm_castsi128_ps(_mm_load_si128(
                                                  reinterpret_cast<const __m128i*>(m)))));
        _mm_storeu_ps(dx + i0 + 4, _mm_and_ps(b, _mm_castsi128_ps(_mm_load_si128(
                                                      reinterpret_cast<const __m128i*>(m + 4)))));
      }
#endif
      for (; i0 + 8 <= end; i0 += 8) {
        const uint32_t byte = packed[i0 >> 3];
        for (int j = 0; j < 8; ++j) {
          uint32_t v;
          std::memcpy(&v, dy + i0 + j, sizeof(v));
          v &= 0u - ((byte >> j) & 1u);
          std::memcpy(dx + i0 + j, &v, sizeof(v));
        }
      }
      for (int64 i = i0; i < end; ++i) {
        uint32_t v;
        std::memcpy(&v, dy + i, sizeof(v));
        v &= 0u - ((packed[i >> 3] >> (i & 7)) & 1u);
        std::memcpy(dx + i, &v, sizeof(v));
      }
    });
  }
};

// Output 1 is the packed mask of input 0: ceil(numel / 8) bytes.
void SetPackedShape(::tensorflow::shape_inference::InferenceContext* c) {
  ::tensorflow::shape_inference::DimensionHandle n = c->NumElements(c->input(0));
  c->set_output(1, c->ValueKnown(n) ? c->Vector((c->Value(n) + 7) / 8)
                                    : c->Vector(c->UnknownDim()));
}

}  // namespace

REGISTER_OP("FedmefSapCompress")
    .Input("x: float")
    .Input("k: int64")
    .Output("values: float")
    .Output("packed: uint8")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      SetPackedShape(c);
      return ::tensorflow::OkStatus();
    })
    .Doc("Kept values and packed keep mask of the k largest-|x| entries (fedmef_tf.sap).");

REGISTER_OP("FedmefSapDecompress")
    .Input("values: float")
    .Input("packed: uint8")
    .Input("shape: int32")
    .Output("x_pruned: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &out));
      c->set_output(0, out);
      return ::tensorflow::OkStatus();
    })
    .Doc("Dense tensor of `shape` from FedmefSapCompress's values and packed mask.");

REGISTER_KERNEL_BUILDER(Name("FedmefSapCompress").Device(DEVICE_CPU), SapCompressOp);
REGISTER_KERNEL_BUILDER(Name("FedmefSapDecompress").Device(DEVICE_CPU), SapDecompressOp);

REGISTER_OP("FedmefBitActivation")
    .Input("x: float")
    .Attr("cap: float = 0.0")
    .Output("y: float")
    .Output("packed: uint8")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      SetPackedShape(c);
      return ::tensorflow::OkStatus();
    })
    .Doc("ReLU (cap <= 0) or ReLU capped at cap, with the packed mask of 0 < x < cap.");

REGISTER_OP("FedmefBitActivationGrad")
    .Input("dy: float")
    .Input("packed: uint8")
    .Output("dx: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return ::tensorflow::OkStatus();
    })
    .Doc("dy where FedmefBitActivation's packed mask is set, else 0.");

REGISTER_KERNEL_BUILDER(Name("FedmefBitActivation").Device(DEVICE_CPU), BitActivationOp);
REGISTER_KERNEL_BUILDER(Name("FedmefBitActivationGrad").Device(DEVICE_CPU), BitActivationGradOp);

}  // namespace fedmef
