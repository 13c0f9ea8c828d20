// The engine's own CPU kernels, compiled on first use for the CPU at hand (engine/native.py builds this file with
// -march=native) and used only where measurement showed PyTorch's own kernels slower (figures in engine/cpu.py).
//
// rows_linear: the product of one decode row with a weight as it is stored, float32, bfloat16 or int8 (with one
// scale per output): faster than oneDNN's product on its own blocked layout of a float weight and than ATen's
// _weight_int8pack_mm (figures in engine/cpu.py, benchmarks/quant_kernels.py); at 4 rows and more theirs are
// faster. int8 sums 16-bit integer products (int8_rows). ATen's int4 kernel was faster than one written here with
// float products (2.5-3.5x) and than one with 16-bit integer products (Zen 4, 2 threads, SmolLM2's up layer in
// cache: 58-65 us against 96-117), so int4 stays with ATen.
//
// decode_attention: one query per (row, head) over a KV cache, the decode step's attention. PyTorch's SDPA on CPU
// runs a flash kernel meant for long queries; for a query of one token its per-block bookkeeping costs more than
// the arithmetic. Here each (row, head) is one pass over its keys (scores), one softmax, one pass over its values.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(int8_t x) { return float(x); }

inline float to_float(uint16_t bf16) {  // bfloat16 is the top half of a float32
  const uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// q (B, H, D) contiguous; k, v: element [b, g, s, d] at b * kb + g * kh + s * ks + d; each row b sees its keys
// [first[b], S); out (B, H, D). Query head h reads key/value head h / (H / K) (grouped-query attention).
template <typename T, int D>
void one_query(const float* q, const T* k, const T* v, const int64_t* first, float* out, int64_t B, int64_t H,
               int64_t K, int64_t S, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
               float scale) {
  const int64_t group = H / K;
  const int64_t grain = std::max<int64_t>(1, 16384 / (S * D));  // small work: no threads woken
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, g = (i % H) / group;
      const int64_t start = first ? std::min<int64_t>(std::max<int64_t>(first[b], 0), S - 1) : 0;
      const int64_t n = S - start;
      const T* kp = k + b * kb + g * kh + start * ks;
      const T* vp = v + b * vb + g * vh + start * vs;
      float qs[D];
      for (int d = 0; d < D; ++d) qs[d] = q[i * D + d] * scale;
      float* ps = p.data();
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = kp + j * ks;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; ++d) s += qs[d] * to_float(kj[d]);
        ps[j] = s;
      }
      float m = ps[0];
      for (int64_t j = 1; j < n; ++j) m = ps[j] > m ? ps[j] : m;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        ps[j] = std::exp(ps[j] - m);
        sum += ps[j];
      }
      float acc[D] = {};
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = vp + j * vs;
        const float w = ps[j];
#pragma omp simd
        for (int d = 0; d < D; ++d) acc[d] += w * to_float(vj[d]);
      }
      float* o = out + i * D;
      const float inv = 1.f / sum;
      for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
}

template <typename T>
void dispatch_head_size(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const int64_t* first, int64_t S, torch::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1);
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
#define YUNQUE_CALL(DD)                                                                                              \
  one_query<T, DD>(q.data_ptr<float>(), kp, vp, first, out.data_ptr<float>(), B, H, K, S, k.stride(0), k.stride(1), \
                   k.stride(2), v.stride(0), v.stride(1), v.stride(2), float(scale))
  switch (D) {
    case 16: YUNQUE_CALL(16); break;
    case 32: YUNQUE_CALL(32); break;
    case 48: YUNQUE_CALL(48); break;
    case 64: YUNQUE_CALL(64); break;
    case 80: YUNQUE_CALL(80); break;
    case 96: YUNQUE_CALL(96); break;
    case 128: YUNQUE_CALL(128); break;
    default: TORCH_CHECK(false, "decode_attention: head size ", D, " is not one of 16, 32, 48, 64, 80, 96, 128");
  }
#undef YUNQUE_CALL
}

// y (M, N) = x (M, K) times the weight (N, K) (float32, bfloat16 or int8), each output column times scales[n] if
// scales is given. Each weight row is read from memory once and from the CPU's first-level cache for the other
// rows of x: for the one or few rows of a decode step, where reading the weights is the whole cost.
template <typename W>
void linear_rows(const float* x, const W* w, const float* scales, float* y, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const W* wn = w + n * K;
      const float scale = scales ? scales[n] : 1.f;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        // 64 partial sums: several vector registers summing side by side, where one would wait on its own
        // previous addition at every step (the sum, not the memory, would then bound a row already in cache)
        float part[64] = {};
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
#pragma omp simd
          for (int j = 0; j < 64; ++j) part[j] += xm[k + j] * to_float(wn[k + j]);
        }
        float s = 0.f;
        for (; k < K; ++k) s += xm[k] * to_float(wn[k]);
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < 64; ++j) s += part[j];
        y[m * N + n] = s * scale;
      }
    }
  });
}

// int8_rows below is written with the CPU's vector instructions (AVX-512 or AVX2, whichever the build targets;
// other CPUs keep linear_rows): 16-bit integer products, IL int8 weights (widened to int16) times IL int16
// activations, summed in pairs into IL / 2 int32 lanes (one instruction with AVX-512 VNNI, two without).
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int IL = 32;
using vint = __m512i;
inline vint ivzero() { return _mm512_setzero_si512(); }
inline vint ivdot(vint acc, const int8_t* w, const int16_t* x) {
  const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512i xv = _mm512_loadu_si512(x);
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, wv, xv);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(wv, xv));
#endif
}
inline int32_t ivsum(vint a) { return _mm512_reduce_add_epi32(a); }
#define YUNQUE_VECTORS 1
#elif defined(__AVX2__)
constexpr int IL = 16;
using vint = __m256i;
inline vint ivzero() { return _mm256_setzero_si256(); }
inline vint ivdot(vint acc, const int8_t* w, const int16_t* x) {
  const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
}
inline int32_t ivsum(vint a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#define YUNQUE_VECTORS 1
#endif

#ifdef YUNQUE_VECTORS
// x's rows as 16-bit integers, each row with its own scale: x ~ q * scale, |q| <= 32767 (the rounding error is at
// most 1/65534 of the row's largest value, finer than bfloat16's 1/256 of each value).
// Returns false, with nothing rounded, if x holds an inf or a nan.
bool rows_to_int16(const float* x, int64_t M, int64_t K, int16_t* q, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    // the largest |x| from the bits (-ffast-math lets the compiler assume floats finite; integers it cannot):
    // without the sign bit, a float's bits order as its magnitude, and inf and nan lie above every finite one
    uint32_t top = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, xm + k, sizeof bits);
      top = std::max(top, bits & 0x7fffffffu);
    }
    if (top >= 0x7f800000u) return false;
    float amax;
    std::memcpy(&amax, &top, sizeof amax);
    const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
    for (int64_t k = 0; k < K; ++k) q[m * K + k] = int16_t(std::nearbyint(xm[k] * inv));
    scales[m] = scale;
  }
  return true;
}

// Columns summed in int32 before the sum moves to float: a lane adds at most 2 * 127 * 32767 per pair of columns
// and takes one pair in IL (two sums): 4096 columns are 128 pairs with AVX2, < 2^31 / 8.3M = 258.
constexpr int64_t INT32_SPAN = 4096;

// int8 weights (N, K) with one scale per row, K a multiple of IL: linear_rows<int8_t>'s function, faster. x is
// rounded to 16-bit integers per row (rows_to_int16), and each weight row is summed against it in integers, read
// straight through (four rows read side by side ran 2x slower from memory) into two sums, in spans of
// INT32_SPAN columns. Widening int8 to float ran at the speed of fp32 from cache; integer products need half the
// instructions (one, vpdpwssd, per 32 weights with AVX-512 VNNI).
void int8_rows(const float* x, const int8_t* w, const float* scales, float* y, int64_t M, int64_t N, int64_t K) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M);
  if (!rows_to_int16(x, M, K, xq.data(), xs.data())) return linear_rows(x, w, scales, y, M, N, K);
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* wn = w + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* xm = xq.data() + m * K;
        float total = 0.f;
        for (int64_t k0 = 0; k0 < K; k0 += INT32_SPAN) {
          const int64_t k1 = std::min(K, k0 + INT32_SPAN);
          vint a0 = ivzero(), a1 = ivzero();
          int64_t k = k0;
          for (; k + 2 * IL <= k1; k += 2 * IL) {
            a0 = ivdot(a0, wn + k, xm + k);
            a1 = ivdot(a1, wn + k + IL, xm + k + IL);
          }
          if (k < k1) a0 = ivdot(a0, wn + k, xm + k);
          total += float(ivsum(a0)) + float(ivsum(a1));
        }
        y[m * N + n] = total * xs[m] * scales[n];
      }
    }
  });
}

#endif

}  // namespace

// x (..., K) float32 or bfloat16; weight (N, K) float32, bfloat16 or int8; scales float32 (N,) or None (one
// factor per output, an int8 weight's) -> (..., N) float32.
torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& weight,
                          const c10::optional<torch::Tensor>& scales) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "rows_linear: x (..., K), weight (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1);
  torch::Tensor sc;
  if (scales.has_value()) {
    sc = scales->contiguous();
    TORCH_CHECK(sc.scalar_type() == torch::kFloat32 && sc.numel() == N, "rows_linear: scales float32 (N,)");
  }
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const torch::Tensor xc = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const torch::Tensor w = weight.contiguous();
  torch::Tensor y = torch::empty({xc.size(0), N}, xc.options());
  const int64_t M = xc.size(0);
  switch (w.scalar_type()) {
    case torch::kFloat32:
      linear_rows(xc.data_ptr<float>(), w.data_ptr<float>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case torch::kBFloat16:
      linear_rows(xc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr()), sp, y.data_ptr<float>(), M,
                  N, K);
      break;
    case torch::kInt8:
#ifdef YUNQUE_VECTORS
      if (sp && K % IL == 0) {
        int8_rows(xc.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
      linear_rows(xc.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    default:
      TORCH_CHECK(false, "rows_linear: weight float32, bfloat16 or int8, not ", w.scalar_type());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

// Attention of one query per row and head: q (B, H, D), k and v (B, K, S, D) float32 or bfloat16 with unit stride
// on D (views of a larger cache are fine), pad (B,) int64 or None, filled a one-element int64 tensor or None (S):
// row b attends to keys [pad[b], filled), the filled part of a static cache's buffers.
// Returns (B, H, D) float32: softmax(q k^T * scale) v.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& pad, const c10::optional<torch::Tensor>& filled,
                               double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: q (B, H, D), k/v (B, K, S, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(3) && q.size(1) % k.size(1) == 0 && k.size(2) > 0,
              "decode_attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.dtype() == v.dtype(), "decode_attention: k, v of one dtype, "
              "unit stride on D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors");
  const torch::Tensor qc = q.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty(qc.sizes(), qc.options());
  torch::Tensor first;
  if (pad.has_value()) {
    first = pad->to(torch::kInt64).contiguous();
    TORCH_CHECK(first.numel() == q.size(0), "decode_attention: pad needs one entry per row");
  }
  const int64_t* fp = first.defined() ? first.data_ptr<int64_t>() : nullptr;
  int64_t S = k.size(2);
  if (filled.has_value()) {
    TORCH_CHECK(filled->numel() == 1, "decode_attention: filled is one number");
    S = filled->item<int64_t>();
    TORCH_CHECK(S > 0 && S <= k.size(2), "decode_attention: ", S, " keys filled of ", k.size(2));
  }
  if (k.dtype() == torch::kFloat32) {
    dispatch_head_size<float>(qc, k, v, fp, S, out, scale);
  } else {
    TORCH_CHECK(k.dtype() == torch::kBFloat16, "decode_attention: k, v float32 or bfloat16, not ", k.dtype());
    dispatch_head_size<uint16_t>(qc, k, v, fp, S, out, scale);
  }
  return out;
}

// The vector instructions this build's integer kernels use, as its compiler targeted them.
std::string vector_isa() {
#if defined(YUNQUE_VECTORS) && defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "avx512-vnni";
#elif defined(YUNQUE_VECTORS) && defined(__AVX512F__)
  return "avx512";
#elif defined(YUNQUE_VECTORS)
  return "avx2";
#else
  return "none";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_isa", &vector_isa, "the vector instructions of the integer kernels: avx512-vnni, avx512, avx2 or none");
  m.def(
      "decode_attention",
      [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
         const c10::optional<torch::Tensor>& pad, double scale) { return decode_attention(q, k, v, pad, {}, scale); },
      "one-query attention over a KV cache (the decode step)");
}

// The kernels as operators of PyTorch's dispatcher (torch.ops.yunque.*), so that a compiled decode
// step calls them from its graph; their shapes for tracing are registered in engine/native.py.
TORCH_LIBRARY(yunque, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? scales) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? pad, Tensor? filled, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(yunque, CPU, m) {
  m.impl("rows_linear", &rows_linear);
  m.impl("decode_attention", &decode_attention);
}
