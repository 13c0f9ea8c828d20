// The engine's own CPU kernels, compiled on first use for the CPU at hand (engine/native.py builds this file with
// -march=native) and used only where measurement showed PyTorch's own kernels slower (figures in engine/cpu.py).
//
// rows_linear: the product of one decode row with a weight as it is stored, float32, bfloat16 or int8 (with one
// scale per output): faster than oneDNN's product on its own blocked layout of a float weight and than ATen's
// _weight_int8pack_mm (figures in engine/cpu.py, benchmarks/quant_kernels.py); at 4 rows and more theirs are
// faster. int8 sums 16-bit integer products (int8_rows).
//
// rows_int4: the same for an int4 weight with a scale and a zero per group of columns, x rounded to 8-bit integers
// per group (int4_rows, 8-bit products summed in int32), faster than ATen's _weight_int4pack_mm_for_cpu for one
// row. ATen's had been faster than a kernel written here with float products (2.5-3.5x) and than one with 16-bit
// products (Zen 4, 2 threads, SmolLM2's up layer in cache: 58-65 us against 96-117): those spent their time
// widening nibbles, where 8-bit products take a whole 64-column block per load.
// dense_int4: an int4 weight widened to float for a product of many rows (a prompt), multiplied by oneDNN.
//
// gelu_tanh: GELU's tanh form (the GPT-2 family's activation) in one pass.
//
// layer_norm: F.layer_norm over the last dimension, its rows on the kernels' own threads (below) like the others'.
//
// pairs_linear: a few bfloat16 rows (a decode step of a batch) times a bfloat16 weight with AVX-512 BF16's dot
// products, on the weight laid out once by pack_pairs; faster than oneDNN's bf16 product up to ~32 rows.
//
// decode_attention: one query per (row, head) over a KV cache, the decode step's attention. PyTorch's SDPA on CPU
// runs a flash kernel meant for long queries; for a query of one token its per-block bookkeeping costs more than
// the arithmetic. Here each (row, head) is one pass over its keys (scores), one softmax, one pass over its values,
// a few heads of a row side by side (their reads in flight together).
//
// Their loops run on OpenMP's team (at::parallel_for), or on the library's own helper threads where the calling
// thread asks for them (pool::parallel_for, set_helpers): the engine's decode steps that run these kernels alone.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

inline float to_float(float x) { return x; }

inline float to_float(int8_t x) { return float(x); }

inline float to_float(uint16_t bf16) {  // bfloat16 is the top half of a float32
  const uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) { return f; }

template <>
inline uint16_t from_float<uint16_t>(float f) {  // to bfloat16, rounded to nearest even (finite f)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The kernels' parallel loops. at::parallel_for (OpenMP) gives each thread an equal share and waits for all of
// them: when another process or thread holds one of the cores (a server's clients, its event loop), every loop waits
// for the thread that was set aside (a server's 16-row decode steps took 11-14 ms against ~7 ms alone; figures in
// engine/cpu.py, helper_rows). Here a loop is cut into chunks that the calling thread and the helpers take
// from one counter, and the caller waits only for the chunks a helper has taken and not finished: a helper that is
// not running leaves its share to the caller. Between loops a helper spins a while, then sleeps until the next one
// (a futex); the caller never waits for it to wake. A thread asks for the helpers (set_helpers) where no OpenMP
// region runs between its loops: OpenMP's team spins on the same cores after each of its regions, and the two
// then take turns (a prefill of oneDNN products ran 1.3x slower with helpers). Elsewhere the loops are OpenMP's.
namespace pool {

#if defined(__linux__)

constexpr int64_t kChunksPerThread = 8;  // chunks of a loop per thread: a helper set aside holds few
constexpr auto kSpin = std::chrono::microseconds(200);  // a decode step's loops come ~10-100 us apart

struct Job {
  void (*call)(const void* f, int64_t begin, int64_t end);
  const void* f;
  int64_t begin, n, chunks;
};

// state: the loop's number (high 32 bits), its chunk count (next 16) and the next chunk to take (low 16)
std::atomic<uint64_t> state{0};
std::atomic<uint32_t> posted{0};  // loops posted: what sleeping helpers wait on
std::atomic<int64_t> done{0};     // chunks of the current loop finished
std::atomic<const Job*> job{nullptr};
std::atomic<int> sleepers{0};
std::atomic<int> wanted{0};  // helpers with a smaller id take part
std::atomic<bool> busy{false};
thread_local bool enabled = false;  // this thread's loops on the helpers
int started = 0;  // helpers started (ids 0 .. started - 1); changed only by the thread holding busy

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

inline void futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

// Take chunks of loop `loop` until none is left (none at all if another loop has begun).
inline void take(uint32_t loop) {
  uint64_t s = state.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t next = s & 0xffff, chunks = (s >> 16) & 0xffff;
    if (uint32_t(s >> 32) != loop || next >= chunks) return;
    if (!state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    const Job* j = job.load(std::memory_order_acquire);  // the loop cannot end while this chunk is not done
    j->call(j->f, j->begin + j->n * int64_t(next) / j->chunks, j->begin + j->n * int64_t(next + 1) / j->chunks);
    done.fetch_add(1, std::memory_order_release);
    s = state.load(std::memory_order_acquire);
  }
}

void helper(int id) {
  pthread_setname_np(pthread_self(), "yunque-helper");  // in top, ps -L, py-spy: its own line
  uint32_t seen = posted.load(std::memory_order_acquire);
  for (;;) {
    auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1; posted.load(std::memory_order_acquire) == seen; ++i) {
      relax();
      if (i % 64 == 0 && (id >= wanted.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() > until)) {
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        if (posted.load(std::memory_order_seq_cst) == seen) futex(&posted, FUTEX_WAIT_PRIVATE, seen);
        sleepers.fetch_sub(1, std::memory_order_seq_cst);
        until = std::chrono::steady_clock::now() + kSpin;
      }
    }
    seen = posted.load(std::memory_order_acquire);
    if (id < wanted.load(std::memory_order_relaxed)) take(uint32_t(state.load(std::memory_order_acquire) >> 32));
  }
}

void after_fork_in_child() {  // the helpers do not exist in a forked child: start new ones on its first loop
  started = 0;
  sleepers.store(0);
  busy.store(false);
}

// f(begin, end) over [begin, end) in chunks of at least `grain` (as at::parallel_for), on this thread and helpers.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int threads = at::get_num_threads();
  // at most 0xffff chunks: their count and the next one share the state word
  const int64_t chunks = std::min<int64_t>({(n + grain - 1) / grain, kChunksPerThread * threads, 0xffff});
  if (chunks <= 1 || threads <= 1 || at::in_parallel_region()) return f(begin, end);
  if (!enabled || busy.exchange(true, std::memory_order_acquire)) {
    // OpenMP's: this thread did not ask for the helpers, or another thread's loop holds them
    return at::parallel_for(begin, end, grain, f);
  }
  if (started < threads - 1) {
    static const int registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);
    (void)registered;
    for (; started < threads - 1; ++started) std::thread(helper, started).detach();
  }
  wanted.store(threads - 1, std::memory_order_relaxed);
  const Job j{[](const void* fp, int64_t lo, int64_t hi) { (*static_cast<const F*>(fp))(lo, hi); }, &f, begin, n,
              chunks};
  const uint32_t loop = uint32_t(state.load(std::memory_order_relaxed) >> 32) + 1;
  done.store(0, std::memory_order_relaxed);
  job.store(&j, std::memory_order_relaxed);
  state.store(uint64_t(loop) << 32 | uint64_t(chunks) << 16, std::memory_order_release);
  posted.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) > 0) futex(&posted, FUTEX_WAKE_PRIVATE, INT32_MAX);
  take(loop);
  while (done.load(std::memory_order_acquire) < chunks) relax();
  busy.store(false, std::memory_order_release);
}

bool set_enabled(bool on) { return std::exchange(enabled, on); }

#else  // no futex: OpenMP's loops
bool set_enabled(bool) { return false; }

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) { at::parallel_for(begin, end, grain, f); }
#endif

}  // namespace pool

// q (B, H, D) contiguous; k, v: element [b, g, s, d] at b * kb + g * kh + s * ks + d; each row b sees its keys
// [first[b], S); out (B, H, D). Query head h reads key/value head h / (H / K) (grouped-query attention).
//
// A decode step reads its keys and values from memory (the step's weights have pushed them out of the CPU's
// caches), and one head's keys are a run of a few KB: read one head after another, the loads in flight at any
// time are those of one run, and the memory's latency, not its bandwidth, sets the pace. So a task takes up to
// kHeadsTogether heads of one row and reads their keys, then their values, position by position across the
// heads: several runs in flight at once. Read in turns of 4 or 16 positions a head, they were no faster than one
// head after another; 12 or 16 heads together were slower than 6 or 8. Zen 4, 2 threads, bf16 caches of 6 heads
// of 64 not in the CPU's caches, alternated with the kernel that took one head a task (9 rounds, medians): 16 rows
// x 128 positions 140 against 221 us a layer (1.58x), 64 x 128 501 against 875 (1.75x, ~50 GB/s, what the memory
// gives two threads), 4 x 128 1.10x, one row 1.00x, 16 x 512 0.97x (both ~42 GB/s). In the 16-row decode step of
// benchmarks/serve.py's model (10 rounds alternated): attention 1.27-1.92 against 1.70-2.35 ms a step, the step
// 1-3% shorter.
constexpr int64_t kHeadsTogether = 8;

// exp(p[j] - max p) in place; returns 1 / their sum. One function for every kernel below and every number of
// heads a task: compiled once, its loops vectorized one way, so a row's scores give the same bits in any task.
__attribute__((noinline)) float softmax_in_place(float* p, int64_t len) {
  float m = p[0];
  for (int64_t j = 1; j < len; ++j) m = p[j] > m ? p[j] : m;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  return 1.f / sum;
}

// Heads a task: as many as kHeadsTogether allows, but rows cut into enough tasks for every thread when they are
// few (one row: its heads in two halves on two threads).
inline int64_t heads_a_task(int64_t B, int64_t H) {
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = std::max((H + kHeadsTogether - 1) / kHeadsTogether, std::min(H, (threads + B - 1) / B));
  return (H + tasks - 1) / tasks;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const uint16_t* p) {  // 16 bfloat16 widened to float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}

// The 16 horizontal sums of v[0..15], lane i the sum of v[i]'s lanes: 15 additions, where 16 reductions take ~60.
// Every v[i] is summed in the same order, ((e0 + e2) + (e1 + e3)) within each 128-bit lane, then the lanes
// ((l0 + l1) + (l2 + l3)), whatever its i and the other vectors: a score's bits do not depend on its neighbours.
inline __m512 sums16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // in each 128-bit lane: v[2i] and v[2i+1] folded to two lanes each
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // in each 128-bit lane: the sums of v[4i .. 4i+3] over that lane
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

// N heads of one row with the CPU's vectors: q (N, D) contiguous, kp[h] and vp[h] head h's first key and value,
// len positions; ps holds len * N scores (head-major); out (N, D).
template <typename T, int D, int N>
void heads_vectors(const float* q, const T* const* kp, const T* const* vp, int64_t len, int64_t ks, int64_t vs,
                   float scale, float* ps, float* out) {
  constexpr int C = D / 16;
  __m512 qv[N][C];
  for (int h = 0; h < N; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = _mm512_mul_ps(_mm512_loadu_ps(q + h * D + 16 * c), _mm512_set1_ps(scale));
  __m512 part[16];  // a score's 16 partial sums, for 16 scores at a time
  int parts = 0;
  int64_t at = 0;  // scores done, position-major: score `at` is position at / N of head at % N
  auto put = [&](int count) {  // head-major into ps, for the softmax below
    alignas(64) float sums[16];
    for (int i = count; i < 16; ++i) part[i] = _mm512_setzero_ps();  // the last few summed as the others
    _mm512_store_ps(sums, sums16(part));
    for (int i = 0; i < count; ++i, ++at) ps[(at % N) * len + at / N] = sums[i];
  };
  for (int64_t j = 0; j < len; ++j) {
    for (int h = 0; h < N; ++h) {
      const T* kj = kp[h] + j * ks;
      __m512 a = _mm512_mul_ps(qv[h][0], load16(kj));
      for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[h][c], load16(kj + 16 * c), a);
      part[parts++] = a;
      if (parts == 16) {
        put(16);
        parts = 0;
      }
    }
  }
  if (parts > 0) put(parts);
  float inv[N];
  for (int h = 0; h < N; ++h) inv[h] = softmax_in_place(ps + h * len, len);
  __m512 acc[N][C];
  for (int h = 0; h < N; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    for (int h = 0; h < N; ++h) {
      const T* vj = vp[h] + j * vs;
      const __m512 w = _mm512_set1_ps(ps[h * len + j]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(w, load16(vj + 16 * c), acc[h][c]);
    }
  }
  for (int h = 0; h < N; ++h) {
    const __m512 scale_h = _mm512_set1_ps(inv[h]);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + h * D + 16 * c, _mm512_mul_ps(acc[h][c], scale_h));
  }
}

// heads_vectors for n heads (1 to kHeadsTogether), each count compiled on its own.
template <typename T, int D>
void heads_vectors_n(int64_t n, const float* q, const T* const* kp, const T* const* vp, int64_t len, int64_t ks,
                     int64_t vs, float scale, float* ps, float* out) {
  switch (n) {
    case 1: return heads_vectors<T, D, 1>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 2: return heads_vectors<T, D, 2>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 3: return heads_vectors<T, D, 3>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 4: return heads_vectors<T, D, 4>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 5: return heads_vectors<T, D, 5>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 6: return heads_vectors<T, D, 6>(q, kp, vp, len, ks, vs, scale, ps, out);
    case 7: return heads_vectors<T, D, 7>(q, kp, vp, len, ks, vs, scale, ps, out);
    default: return heads_vectors<T, D, kHeadsTogether>(q, kp, vp, len, ks, vs, scale, ps, out);
  }
}
#endif

template <typename T, int D>
void one_query(const float* q, const T* k, const T* v, const int64_t* first, float* out, int64_t B, int64_t H,
               int64_t K, int64_t S, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
               float scale) {
  static_assert(D % 16 == 0, "head sizes are multiples of 16 (the vectors' width)");
  const int64_t G = heads_a_task(B, H), group = H / K, per_row = (H + G - 1) / G;
  const int64_t grain = std::max<int64_t>(1, 16384 / (S * D * G));  // small work: no threads woken
  pool::parallel_for(0, B * per_row, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S * G);  // the scores of a task's heads, head after head
    const T* kp[kHeadsTogether];
    const T* vp[kHeadsTogether];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / per_row, h0 = (i % per_row) * G, n = std::min(G, H - h0);
      const int64_t start = first ? std::min<int64_t>(std::max<int64_t>(first[b], 0), S - 1) : 0;
      const int64_t len = S - start;
      for (int64_t h = 0; h < n; ++h) {
        const int64_t g = (h0 + h) / group;
        kp[h] = k + b * kb + g * kh + start * ks;
        vp[h] = v + b * vb + g * vh + start * vs;
      }
      const float* qh = q + (b * H + h0) * D;  // the task's n heads, one after another
      float* o = out + (b * H + h0) * D;
#if defined(__AVX512F__)
      heads_vectors_n<T, D>(n, qh, kp, vp, len, ks, vs, scale, p.data(), o);
#else
      float qs[kHeadsTogether][D];
      float acc[kHeadsTogether][D];
      for (int64_t h = 0; h < n; ++h)
        for (int d = 0; d < D; ++d) qs[h][d] = qh[h * D + d] * scale;
      float* ps = p.data();  // head h's scores at ps[h * len + j]
      for (int64_t j = 0; j < len; ++j) {
        for (int64_t h = 0; h < n; ++h) {
          const T* kj = kp[h] + j * ks;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qs[h][d] * to_float(kj[d]);
          ps[h * len + j] = s;
        }
      }
      float inv[kHeadsTogether];
      for (int64_t h = 0; h < n; ++h) {
        inv[h] = softmax_in_place(ps + h * len, len);
        for (int d = 0; d < D; ++d) acc[h][d] = 0.f;
      }
      for (int64_t j = 0; j < len; ++j) {
        for (int64_t h = 0; h < n; ++h) {
          const T* vj = vp[h] + j * vs;
          const float w = ps[h * len + j];
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[h][d] += w * to_float(vj[d]);
        }
      }
      for (int64_t h = 0; h < n; ++h)
        for (int d = 0; d < D; ++d) o[h * D + d] = acc[h][d] * inv[h];
#endif
    }
  });
}

// f(std::integral_constant<int, D>{}) for a head size the attention kernels are compiled for (a template each); an
// error naming `kernel` for any other.
template <typename F>
void with_head_size(int64_t D, const char* kernel, const F& f) {
  switch (D) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 48: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, kernel, ": head size ", D, " is not one of 16, 32, 48, 64, 80, 96, 128");
  }
}

template <typename T>
void dispatch_head_size(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const int64_t* first, int64_t S, torch::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), K = k.size(1);
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  with_head_size(D, "decode_attention", [&](auto d) {
    one_query<T, decltype(d)::value>(q.data_ptr<float>(), kp, vp, first, out.data_ptr<float>(), B, H, K, S,
                                     k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                     float(scale));
  });
}

constexpr int64_t kQueriesTogether = 4;  // prompt_queries' queries a pass over the keys

// kt[d * St + j] = k's position j, dimension d, for j in [lo, S): one element at a time (vectorized, GCC made it
// gathers over the keys, 13% of the kernel's time).
template <typename T, int D>
__attribute__((noinline, optimize("no-tree-vectorize"))) void keys_by_dimension(const T* k, int64_t ks, int64_t lo,
                                                                                 int64_t S, int64_t St, float* kt) {
  for (int64_t j = lo; j < S; ++j)
    for (int d = 0; d < D; ++d) kt[d * St + j] = to_float(k[j * ks + d]);
}

// acc[d] = sum over j in [lo, p] of w[j] * v[j * D + d], the sums held in vector registers (GCC kept a plain
// array of them on the stack, a load and a store for every product).
template <int D>
inline void weighted_values(const float* w, const float* v, int64_t lo, int64_t p, float* acc) {
#if defined(__AVX512F__)
  constexpr int C = D / 16;
  __m512 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
  for (int64_t j = lo; j <= p; ++j) {
    const __m512 wj = _mm512_set1_ps(w[j]);
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(v + j * D + 16 * c), a[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
#else
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  for (int64_t j = lo; j <= p; ++j) {
    const float wj = w[j];
#pragma omp simd
    for (int d = 0; d < D; ++d) acc[d] += wj * v[j * D + d];
  }
#endif
}

// A prompt's queries over its keys (prefill): q (B, H, Tq, D) contiguous, the last Tq of S positions; k, v: element
// [b, g, s, d] at b * kb + g * kh + s * ks + d. Row b's query at position p sees keys [first[b], p], and a padding
// query (p < first[b]) itself alone, as the mask that SDPA gets says; out (B, H, Tq, D) in T. A task is one head of
// one row: its keys are widened to float32 once, laid out position-minor so that 16 scores of one query are summed
// in one vector over the head's dimensions, and its values once. PyTorch's SDPA (a flash kernel, built for long
// queries) spent ~100 us a row of 6 heads of 66 positions on this, ~17 GFLOP/s (Zen 4, bf16).
template <typename T, int D>
void prompt_queries(const float* q, const T* k, const T* v, const int64_t* first, T* out, int64_t B, int64_t H,
                    int64_t K, int64_t Tq, int64_t S, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh,
                    int64_t vs, float scale) {
  const int64_t group = H / K, St = (S + 15) / 16 * 16;  // a key row's length, whole vectors of 16
  pool::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * St), vf(S * D), sc(kQueriesTogether * St);
    int64_t loaded = -1;  // the row and key head whose keys and values kt and vf hold
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, g = h / group;
      const int64_t lo = first ? std::min<int64_t>(std::max<int64_t>(first[b], 0), S - 1) : 0;
      const T* kg = k + b * kb + g * kh;
      const T* vg = v + b * vb + g * vh;
      if (b * K + g != loaded) {
        for (int d = 0; d < D; ++d) std::fill(kt.begin() + d * St, kt.begin() + d * St + lo, 0.f);
        keys_by_dimension<T, D>(kg, ks, lo, S, St, kt.data());
        for (int64_t j = lo; j < S; ++j) {
#pragma omp simd
          for (int d = 0; d < D; ++d) vf[j * D + d] = to_float(vg[j * vs + d]);
        }
        for (int d = 0; d < D; ++d) std::fill(kt.begin() + d * St + S, kt.begin() + (d + 1) * St, 0.f);
        loaded = b * K + g;
      }
      // four queries at a time: each key vector loaded serves four independent sums (one sum alone waits on its
      // own additions, one after another over the head's dimensions)
      for (int64_t t0 = 0; t0 < Tq; t0 += kQueriesTogether) {
        const int64_t nq = std::min<int64_t>(kQueriesTogether, Tq - t0), last = S - Tq + t0 + nq - 1;
        float qs[kQueriesTogether][D] = {};
        const float* qt = q + ((b * H + h) * Tq + t0) * D;
        for (int64_t u = 0; u < nq; ++u) {
#pragma omp simd
          for (int d = 0; d < D; ++d) qs[u][d] = qt[u * D + d] * scale;
        }
        for (int64_t jb = lo / 16 * 16; jb <= last; jb += 16) {
          float acc[kQueriesTogether][16] = {};
          for (int d = 0; d < D; ++d) {
            const float* kd = kt.data() + d * St + jb;
            for (int u = 0; u < kQueriesTogether; ++u) {
              const float qd = qs[u][d];
#pragma omp simd
              for (int jj = 0; jj < 16; ++jj) acc[u][jj] += qd * kd[jj];
            }
          }
          for (int u = 0; u < kQueriesTogether; ++u)
            for (int jj = 0; jj < 16; ++jj) sc[u * St + jb + jj] = acc[u][jj];
        }
        for (int64_t u = 0; u < nq; ++u) {
          const int64_t p = S - Tq + t0 + u;
          T* o = out + ((b * H + h) * Tq + t0 + u) * D;
          if (p < lo) {  // padding: its own value
            for (int d = 0; d < D; ++d) o[d] = vg[p * vs + d];
            continue;
          }
          float* su = sc.data() + u * St;
          const float inv = softmax_in_place(su + lo, p - lo + 1);
          float acc[D];
          weighted_values<D>(su, vf.data(), lo, p, acc);
          for (int d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] * inv);
        }
      }
    }
  });
}

template <typename T>
void dispatch_prompt(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const int64_t* first,
                     torch::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), K = k.size(1), S = k.size(2);
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  with_head_size(D, "prompt_attention", [&](auto d) {
    prompt_queries<T, decltype(d)::value>(q.data_ptr<float>(), kp, vp, first, op, B, H, K, Tq, S, k.stride(0),
                                          k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                          float(scale));
  });
}

// y (M, N) = x (M, K) times the weight (N, K) (float32, bfloat16 or int8), each output column times scales[n] if
// scales is given. Each weight row is read from memory once and from the CPU's first-level cache for the other
// rows of x: for the one or few rows of a decode step, where reading the weights is the whole cost.
template <typename W>
void linear_rows(const float* x, const W* w, const float* scales, float* y, int64_t M, int64_t N, int64_t K) {
  pool::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
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
  pool::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
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

#if defined(__AVX2__)
#define YUNQUE_INT4 1
// int4_rows below: 8-bit products in 256-bit vectors, 32 unsigned weights times 32 signed activations summed by
// fours into 8 int32 lanes (one instruction with VNNI, three with plain AVX2). Zen 4 runs 512-bit vectors as two
// halves anyway, and 256 bits fit a 64-column block of int4 weights in one load.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bfloat16 (the low 128 bits' 16-bit halves) as 8 floats
inline __m256 bf16_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }

inline __m256 load8(const uint16_t* x) {  // 8 bfloat16
  return bf16_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool INT4_PAIRS = true;  // int4_rows takes two blocks a 512-bit vector (one instruction where 256-bit
                                   // vectors take two: Zen 4 executes it in two halves, but issues it once)
#else
constexpr bool INT4_PAIRS = false;
#endif

// Where column k of a row of x goes in int4_rows' layout of it: per 64-column block, the 32 even columns then the
// 32 odd ones (the order of an int4 row's low and high nibbles); with INT4_PAIRS, per pair of blocks, the even
// columns of both, then the odd ones of both (a last odd block as before).
inline int64_t q_position(int64_t k, int64_t blocks) {
  const int64_t b = k / 64, j = k % 64;
  if (INT4_PAIRS && b < blocks / 2 * 2) return (b / 2) * 128 + (j % 2) * 64 + (b % 2) * 32 + j / 2;
  return b * 64 + (j % 2) * 32 + j / 2;
}

// x's rows as 8-bit integers for int4_rows, one scale per group of G columns (as llama.cpp's Q8_0 rounds the
// activations of its Q4_0 products, with G = 32): x ~ q * a, |q| <= 127, the rounding error at most 1/254 of the
// group's largest |x|. q holds them as q_position says, and lane holds the scale of each of a block's 8 int32
// lanes (lane i sums columns 8i..8i+7). Per group: sum, x's exact sum; qsum, -8 a times q's sum (the int4
// weights' offset of 8).
// Returns false, with nothing rounded, if x holds an inf or a nan.
template <typename T>  // float or bfloat16 (uint16_t)
bool rows_to_int8_blocks(const T* x, int64_t M, int64_t K, int64_t G, int8_t* q, float* lane, float* sum,
                         float* qsum) {
  int32_t ints[256];  // one group's integers in column order (G <= 256 on this path), before the even/odd split
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      const T* xg = x + m * K + g0;
      // the largest |x| from the bits, as in rows_to_int16: unsigned, they order as magnitudes, inf and nan on top
      __m256i top = _mm256_setzero_si256();
      for (int64_t k = 0; k < G; k += 8) {
        const __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(load8(xg + k)), _mm256_set1_epi32(0x7fffffff));
        top = _mm256_max_epu32(top, magnitude);
      }
      uint32_t t[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), top);
      uint32_t bits = 0;
      for (uint32_t v : t) bits = std::max(bits, v);
      if (bits >= 0x7f800000u) return false;
      float amax;
      std::memcpy(&amax, &bits, sizeof amax);
      const float a = amax > 0.f ? amax / 127.f : 1.f;
      const __m256 inv = _mm256_set1_ps(1.f / a);
      __m256 s = _mm256_setzero_ps();
      __m256i qs = _mm256_setzero_si256();
      for (int64_t k = 0; k < G; k += 8) {
        const __m256 xv = load8(xg + k);
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(xv, inv));  // to nearest even, as nearbyint
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ints + k), v);
        s = _mm256_add_ps(s, xv);
        qs = _mm256_add_epi32(qs, v);
      }
      for (int64_t k = g0; k < g0 + G; ++k) q[m * K + q_position(k, K / 64)] = int8_t(ints[k - g0]);
      for (int64_t k = g0; k < g0 + G; k += 8) lane[(m * K + k) / 8] = a;
      int32_t qt[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qt), qs);
      sum[(m * K + g0) / G] = hsum8(s);
      qsum[(m * K + g0) / G] = -8.f * a * float(qt[0] + qt[1] + qt[2] + qt[3] + qt[4] + qt[5] + qt[6] + qt[7]);
    }
  }
  return true;
}

const __m256i lanes01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
const __m256i lanes23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);

// One 64-column block: 32 bytes of int4 weights (low nibbles the even columns, high ones the odd) times x's 64
// int8 (q: even columns, then odd) as 8 float lanes, lane i the sum over columns 8i..8i+7.
inline __m256 block_sums(const uint8_t* w, const int8_t* q) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
  __m256i d = dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  d = dot_u8s8(d, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
  return _mm256_cvtepi32_ps(d);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// block_sums for two blocks (64 bytes of weights; q: both blocks' even columns, then their odd ones): 16 lanes,
// the first block's 8 then the second's.
inline __m512 pair_sums(const uint8_t* w, const int8_t* q) {
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i bytes = _mm512_loadu_si512(w);
  const __m512i lo = _mm512_and_si512(bytes, low), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
  const __m512i d = dot_u8s8(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q));
  return _mm512_cvtepi32_ps(dot_u8s8(d, hi, _mm512_loadu_si512(q + 64)));
}

// the weight scales of a pair of blocks in its 16 lanes: from 4 bfloat16 (G = 32), 2 (G = 64) or 1
inline __m512 pair_scales(const uint16_t* s, int64_t G) {
  if (G == 32 || G == 64) {
    const __m128i h = G == 32 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))
                              : _mm_cvtsi32_si128(int32_t(uint32_t(s[0]) | uint32_t(s[1]) << 16));
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_zextsi128_si256(h)), 16));
    const __m512i index = G == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(index, f);
  }
  return _mm512_set1_ps(to_float(s[0]));
}
#endif

// int4 weights (N, K / 2), column 2j in the low nibble of byte j and 2j + 1 in the high one, with bfloat16 scales
// and zeros (N, K / G): w = (q - 8) * scale + zero. K a multiple of 64; G 32 or a multiple of 64. x is rounded
// to 8-bit integers per group (rows_to_int8_blocks); each 64-column block of a weight row is one load, its
// nibbles summed against x in integers, and the block's sums move to float times (weight scale x activation
// scale); the offset and zero terms are per group, summed after: sum_g scale_g * qsum_g + zero_g * sum_g.
void int4_rows(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, float* y, int64_t M,
               int64_t N, int64_t K, int64_t G, const int8_t* q, const float* lane, const float* sum,
               const float* qsum) {
  const int64_t blocks = K / 64, groups = K / G;
  pool::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wn = w + n * (K / 2);
      const uint16_t* sn = scales + n * groups;
      const uint16_t* zn = zeros + n * groups;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* qm = q + m * K;
        const float* lm = lane + m * (K / 8);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t b = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 wide = _mm512_setzero_ps();
        for (; b + 2 <= blocks; b += 2) {
          wide = _mm512_fmadd_ps(pair_sums(wn + b * 32, qm + b * 64),
                                 _mm512_mul_ps(pair_scales(sn + b * 64 / G, G), _mm512_loadu_ps(lm + b * 8)), wide);
        }
        acc1 = _mm256_add_ps(_mm512_castps512_ps256(wide), _mm512_extractf32x8_ps(wide, 1));
#endif
        if (G == 32) {  // two groups a block: lanes 0-3 take the first scale, 4-7 the second
          for (; b + 2 <= blocks; b += 2) {
            const __m256 s4 = bf16_to_float(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sn + 2 * b)));
            const __m256 scale0 = _mm256_mul_ps(_mm256_permutevar8x32_ps(s4, lanes01), _mm256_loadu_ps(lm + b * 8));
            const __m256 scale1 = _mm256_mul_ps(_mm256_permutevar8x32_ps(s4, lanes23), _mm256_loadu_ps(lm + b * 8 + 8));
            acc0 = _mm256_fmadd_ps(block_sums(wn + b * 32, qm + b * 64), scale0, acc0);
            acc1 = _mm256_fmadd_ps(block_sums(wn + b * 32 + 32, qm + b * 64 + 64), scale1, acc1);
          }
          if (b < blocks) {
            int32_t two;
            std::memcpy(&two, sn + 2 * b, sizeof two);
            const __m256 s2 = bf16_to_float(_mm_cvtsi32_si128(two));
            const __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(s2, lanes01), _mm256_loadu_ps(lm + b * 8));
            acc0 = _mm256_fmadd_ps(block_sums(wn + b * 32, qm + b * 64), scale, acc0);
          }
        } else {  // one group for one block or more
          for (; b < blocks; ++b) {
            acc0 = _mm256_fmadd_ps(block_sums(wn + b * 32, qm + b * 64),
                                   _mm256_mul_ps(_mm256_set1_ps(to_float(sn[b * 64 / G])), _mm256_loadu_ps(lm + b * 8)),
                                   acc0);
          }
        }
        // the offset and zero terms, per group: 8 groups a vector
        const float* sm = sum + m * groups;
        const float* qm8 = qsum + m * groups;
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8) {
          acc1 = _mm256_fmadd_ps(bf16_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zn + g))),
                                 _mm256_loadu_ps(sm + g), acc1);
          acc0 = _mm256_fmadd_ps(bf16_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sn + g))),
                                 _mm256_loadu_ps(qm8 + g), acc0);
        }
        float total = hsum8(_mm256_add_ps(acc0, acc1));
        for (; g < groups; ++g) total += to_float(zn[g]) * sm[g] + to_float(sn[g]) * qm8[g];
        y[m * N + n] = total;
      }
    }
  });
}

inline void store8(float* out, __m256 f) { _mm256_storeu_ps(out, f); }

inline void store8(uint16_t* out, __m256 f) {  // as bfloat16, rounded to nearest even as from_float
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#endif

// An int4 weight as QuantLinear stores it (see int4_rows) widened to w = (q - 8) * scale + zero, float32 or (rounded
// to nearest even) bfloat16, (N, K): what a product of many rows hands to oneDNN. Rows of the weight in parallel.
template <typename T>
void widen_int4(const uint8_t* w, const uint16_t* scales, const uint16_t* zeros, T* out, int64_t N, int64_t K,
                int64_t G) {
  const int64_t groups = K / G;
  pool::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const float s = to_float(scales[n * groups + g]), z = to_float(zeros[n * groups + g]);
        const uint8_t* wg = w + n * (K / 2) + g * (G / 2);
        T* og = out + n * K + g * G;
        int64_t k = 0;
#ifdef YUNQUE_INT4
        const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z), eight = _mm256_set1_ps(8.f);
        for (; k + 32 <= G; k += 32) {  // 16 bytes, 32 columns: nibbles interleaved back into column order
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + k / 2));
          const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(15));
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
          const __m128i cols[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
          for (int half = 0; half < 4; ++half) {
            const __m128i c = half % 2 ? _mm_srli_si128(cols[half / 2], 8) : cols[half / 2];
            // (q - 8) * scale + zero, one rounding (the product is exact), as QuantLinear.dequantize computes it
            const __m256 centred = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), eight);
            store8(og + k + 8 * half, _mm256_fmadd_ps(centred, sv, zv));
          }
        }
#endif
        for (; k < G; ++k) og[k] = from_float<T>(std::fma(float((wg[k / 2] >> (4 * (k % 2))) & 15) - 8.f, s, z));
      }
    }
  });
}

// Inverse transform sampling from softmax(logits * scale), row by row, as engine/sampling.py's inverse_cdf draws
// from the probabilities softmax gives: logits (B, V) float32 or bfloat16 contiguous, u (B,) float32 in [0, 1).
// Each row: its largest logit, then exp((logit - largest) * scale) summed in blocks of kSampleBlock tokens (the
// probabilities, not normalised), the first block whose running sum exceeds u times the total, and within that
// block the first token whose running sum exceeds what is left. The exponentials of the one block found are
// computed again rather than kept: a row is read twice and never written. Rounding can bring the target up to the
// total; the first block (token) reaching the total is then the bound, so no token of probability 0 is drawn.
// A row holding an infinity or a NaN gives -1 (the caller draws that row another way).
// `python benchmarks/sampling.py` (Zen 4, 2 threads), 16 rows of 50,257, sample() with this kernel against
// softmax and inverse_cdf: 246 against 3,162 us over bf16 logits, 261 against 599 us over fp32; built for AVX2
// alone (ATEN_CPU_CAPABILITY=avx2 on the same CPU), fp32: 305-397 against 621-805 us.
constexpr int64_t kSampleBlock = 256;

inline bool finite_bits(float x) {  // -ffast-math lets the compiler assume std::isfinite: look at the bits
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) != 0x7f800000u;
}

inline bool finite_bits(uint16_t bf16) { return (bf16 & 0x7f80u) != 0x7f80u; }

// exp(x) for x <= 0, 0 below -87 (where expf leaves the normal floats): x = n ln 2 + r with |r| <= ln 2 / 2, exp(r)
// by a polynomial of degree 6 (Cephes' expf coefficients, ~1 ulp), times 2^n set in the exponent bits. Inline, so
// that a loop over a row vectorizes whole (a call of glibc's vector expf per 16 values took 1.7x as long).
inline float exp_nonpositive(float x) {
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.f ? 0.f : p * two_n;
}

inline float scaled_exp(float logit, float largest, float scale) {
  return exp_nonpositive((logit - largest) * scale);  // <= 0: the largest logit gives 1
}

template <typename T>
void sample_rows_impl(const T* logits, const float* u, float scale, int64_t* out, int64_t B, int64_t V) {
  const int64_t blocks = (V + kSampleBlock - 1) / kSampleBlock;
  pool::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cdf(blocks);
    float inside[kSampleBlock];
    for (int64_t b = begin; b < end; ++b) {
      const T* l = logits + b * V;
      float largest = to_float(l[0]);
      int bad = 0;
#pragma omp simd reduction(max : largest) reduction(| : bad)
      for (int64_t j = 0; j < V; ++j) {
        largest = std::max(largest, to_float(l[j]));
        bad |= !finite_bits(l[j]);
      }
      if (bad) {
        out[b] = -1;
        continue;
      }
      float running = 0.f;
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t lo = k * kSampleBlock, hi = std::min(V, lo + kSampleBlock);
        // the exponentials of the block first, then their sum: one loop of both kept a single chain of vector
        // sums and ran 1.7x (AVX-512) to 2.7x (AVX2) slower
        float e[kSampleBlock];
        const int64_t n = hi - lo;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) e[j] = scaled_exp(to_float(l[lo + j]), largest, scale);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += e[j];
        running += s;
        cdf[k] = running;
      }
      const float total = cdf[blocks - 1], target = u[b] * total;
      int64_t k = 0;
      while (k < blocks - 1 && !(cdf[k] > target) && !(cdf[k] >= total)) ++k;
      const float rest = target - (k > 0 ? cdf[k - 1] : 0.f);
      const int64_t lo = k * kSampleBlock, n = std::min(V, lo + kSampleBlock) - lo;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) inside[j] = scaled_exp(to_float(l[lo + j]), largest, scale);
      for (int64_t j = 1; j < n; ++j) inside[j] += inside[j - 1];
      int64_t at = 0;
      while (at < n - 1 && !(inside[at] > rest) && !(inside[at] >= inside[n - 1])) ++at;
      out[b] = lo + at;
    }
  });
}

// pairs_linear: bfloat16 rows times a bfloat16 weight with the CPU's bf16 dot-product instruction (AVX-512 BF16,
// vdpbf16ps: 16 sums of two products in one instruction). The weight is laid out once in tiles of 16 outputs
// (pack_pairs): for each pair of input columns, the tile's 16 pairs side by side, one 64-byte vector. Each step of
// a tile loads that vector and adds it, times the pair broadcast from each of R rows of x, into R accumulators; NT
// tiles side by side share each broadcast. The accumulators stay in registers for the whole sum, and the weight is
// read from memory once for all the rows of x (the R-row blocks after the first read it from the CPU's cache).
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define YUNQUE_PAIRS 1
constexpr int64_t kPairTile = 16;

// R rows of x (pairs: uint32, Kp per row) times NT tiles from w (each Kp * 32 bfloat16), plus bias, into y's
// columns n0.. (bfloat16, N per row); columns from N on are not written. pf: tiles to fetch meanwhile, or null.
template <int R, int NT>
inline void pair_tiles(const uint32_t* x, const uint16_t* w, int64_t Kp, const float* bias, uint16_t* y, int64_t n0,
                       int64_t N, const char* pf) {
  __m512 acc[R][NT];
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_ps();
  const int64_t stride = Kp * 32;
  for (int64_t kp = 0; kp < Kp; ++kp) {
    __m512i wv[NT];
    for (int t = 0; t < NT; ++t) wv[t] = _mm512_loadu_si512(w + t * stride + kp * 32);
    if (pf)
      for (int t = 0; t < NT; ++t) _mm_prefetch(pf + (t * stride + kp * 32) * 2, _MM_HINT_T0);
    for (int m = 0; m < R; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(x[m * Kp + kp]));
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], xb, (__m512bh)wv[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const int64_t n = n0 + t * kPairTile;
    if (n >= N) break;
    const int64_t left = std::min<int64_t>(kPairTile, N - n);
    const __mmask16 mask = __mmask16((1u << left) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < R; ++m)
      _mm256_mask_storeu_epi16(y + m * N + n, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][t], b)));
  }
}

// All M rows times the NT tiles from tile t: blocks of R rows, then the r < R rows left (r accumulators each). The
// tiles' weights are read from memory by the first block, which fetches pf meanwhile (the next tiles, or null), and
// from the cache by the others. A 50,257 x 384 head at 8 rows, alternated builds: 1,070-1,498 us against
// 1,542-2,103 without the fetch (Zen 4).
template <int R, int NT>
void pair_block(const uint32_t* x, int64_t M, const uint16_t* w, int64_t Kp, const float* bias, uint16_t* y,
                int64_t N, int64_t t, const char* pf) {
  int64_t m = 0;
  for (; m + R <= M; m += R, pf = nullptr)
    pair_tiles<R, NT>(x + m * Kp, w + t * Kp * 32, Kp, bias, y + m * N, t * kPairTile, N, pf);
  if constexpr (R > 1) {
    if (m < M) pair_block<R - 1, NT>(x + m * Kp, M - m, w, Kp, bias, y + m * N, N, t, pf);
  }
}

// Tiles [tb, te) of the output for all M rows, NT at a time (the last ones one at a time).
template <int R, int NT>
void pair_rows(const uint32_t* x, int64_t M, const uint16_t* w, int64_t Kp, const float* bias, uint16_t* y, int64_t N,
               int64_t tb, int64_t te) {
  int64_t t = tb;
  for (; t + NT <= te; t += NT) {
    const bool next = t + 2 * NT <= te;
    const char* pf = next ? reinterpret_cast<const char*>(w + (t + NT) * Kp * 32) : nullptr;
    pair_block<R, NT>(x, M, w, Kp, bias, y, N, t, pf);
  }
  for (; t < te; ++t) pair_block<R, 1>(x, M, w, Kp, bias, y, N, t, nullptr);
}
#endif

// Layer norm of M rows of N: (x - mean) / sqrt(var + eps) * w + b, float32 inside, the variance biased (as
// F.layer_norm). Rows in parallel, a small batch on the calling thread alone.
template <typename T>
void layer_norm_impl(const T* x, const T* w, const T* b, T* y, int64_t M, int64_t N, float eps) {
  pool::parallel_for(0, M, std::max<int64_t>(1, 32768 / N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < N; ++j) sum += to_float(xr[j]);
      const float mean = sum / float(N);
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < N; ++j) {
        const float d = to_float(xr[j]) - mean;
        squares += d * d;
      }
      const float rstd = 1.f / std::sqrt(squares / float(N) + eps);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const float v = (to_float(xr[j]) - mean) * rstd * (w ? to_float(w[j]) : 1.f) + (b ? to_float(b[j]) : 0.f);
        yr[j] = from_float<T>(v);
      }
    }
  });
}

// GELU in its tanh form, x * sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3)) = x * sigmoid(2z), z the tanh's argument:
// the GPT-2 family's activation, in one pass with float32 inside. The sigmoid takes exp_nonpositive of -|2z| (for
// 2z < 0, sigmoid(2z) = e / (1 + e)): inline, so the loop vectorizes whole, where glibc's vector expf was a call per
// 8 values (figures in engine/cpu.py, DecodeMLP).
template <typename T>
void gelu_tanh_impl(const T* x, T* y, int64_t n) {
  pool::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 256;
    float buf[kBlock];
    for (int64_t i = begin; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const float v = to_float(x[i + j]);
        const float z2 = 1.5957691216057308f * (v + 0.044715f * v * v * v);
        const float e = exp_nonpositive(-std::fabs(z2));
        buf[j] = v * (z2 >= 0.f ? 1.f : e) / (1.f + e);
      }
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) y[i + j] = from_float<T>(buf[j]);
    }
  });
}

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

// A bfloat16 weight (N, K), K even, laid out for pairs_linear: (ceil(N / 16), K / 2, 32), tile t holding outputs
// 16t.. (zeros past N), for each pair of input columns their 16 pairs side by side.
torch::Tensor pack_pairs(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.size(1) % 2 == 0,
              "pack_pairs: weight bfloat16 (N, K), K even");
  const int64_t N = weight.size(0), K = weight.size(1), T = (N + 15) / 16;
  torch::Tensor padded = torch::zeros({T * 16, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({T, 16, K / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({T, K / 2, 32});
}

// Whether this build has pairs_linear (the CPU has AVX-512 BF16 and the compiler targeted it).
bool has_pairs() {
#ifdef YUNQUE_PAIRS
  return true;
#else
  return false;
#endif
}

// x (..., K) bfloat16 times a weight packed by pack_pairs (out_features outputs), plus bias (out_features) if given
// -> (..., out_features) bfloat16, summed in float32.
torch::Tensor pairs_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kBFloat16 && packed.size(2) == 32 &&
                  x.size(-1) == 2 * packed.size(1) && out_features <= 16 * packed.size(0) &&
                  out_features > 16 * (packed.size(0) - 1),
              "pairs_linear: x (..., K), packed (ceil(N / 16), K / 2, 32) from pack_pairs");
  const int64_t K = x.size(-1), Kp = K / 2, N = out_features, T = packed.size(0);
  const torch::Tensor xc = x.reshape({-1, K}).to(torch::kBFloat16).contiguous();
  const int64_t M = xc.size(0);
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "pairs_linear: bias (out_features,)");
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  torch::Tensor y = torch::empty({M, N}, xc.options());
  if (M == 0) return y.view(shape);
#ifdef YUNQUE_PAIRS
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  // tiles side by side (NT) and rows per block (R) by the number of rows: a few rows take more tiles at once, to
  // keep as many independent sums going (the instruction's latency covered). Past 8 rows, blocks of 16 rows x 2
  // tiles: each tile is read from memory by one block of 16 rows rather than two of 8. Its 32 sums and the two
  // weight vectors are more than the 32 vector registers, so GCC keeps a few sums on the stack (in the first-level
  // cache), and it is still faster. Zen 4, 2 threads, alternated in one process (20 rounds, medians) with the 8 x 3
  // blocks that 8 rows keep: the 50,257 x 384 head 1.21-1.26x faster at 16 rows, 1.16x at 12, 1.13x at 24 and 32,
  // 1.06x at 9; the 30M GPT-2 shape's block layers 1.21x at 16, 1.03-1.16x at 12-32 (a third run at 16 rows, on a
  // busier machine: 1.01-1.04x). 16 x 2 ran 1.07-1.11x faster than 14 x 2 (no sums on the stack) at 16 rows, and
  // 9 x 3 was slower than both; at 8 rows blocks of 14 ran at 0.88x the speed of 8 x 3
  auto run = [&](auto r, auto nt) {
    constexpr int R = decltype(r)::value, NT = decltype(nt)::value;
    const int64_t groups = (T + NT - 1) / NT;
    const int64_t grain = std::max<int64_t>(1, 4096 / (NT * Kp * std::min<int64_t>(M, 16)));
    pool::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
      pair_rows<R, NT>(xp, M, w, Kp, bp, yp, N, gb * NT, std::min(T, ge * NT));
    });
  };
  using std::integral_constant;
  if (M == 1) run(integral_constant<int, 1>{}, integral_constant<int, 8>{});
  else if (M == 2) run(integral_constant<int, 2>{}, integral_constant<int, 6>{});
  else if (M <= 4) run(integral_constant<int, 4>{}, integral_constant<int, 4>{});
  else if (M <= 8) run(integral_constant<int, 8>{}, integral_constant<int, 3>{});
  else run(integral_constant<int, 16>{}, integral_constant<int, 2>{});
#else
  TORCH_CHECK(false, "pairs_linear: this build has no AVX-512 BF16 (has_pairs() is false)");
#endif
  return y.view(shape);
}

// GELU's tanh form of x (float32 or bfloat16), as F.gelu(x, approximate="tanh"), in x's dtype. ATen's runs ~3x
// slower than its erf form; this one 2.5x faster than ATen's (figures in engine/cpu.py, DecodeMLP).
torch::Tensor gelu_tanh(const torch::Tensor& x) {
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty_like(xc);
  if (xc.scalar_type() == torch::kFloat32) {
    gelu_tanh_impl(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  } else {
    TORCH_CHECK(xc.scalar_type() == torch::kBFloat16, "gelu_tanh: x float32 or bfloat16, not ", xc.scalar_type());
    gelu_tanh_impl(reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()),
                   xc.numel());
  }
  return y;
}

// F.layer_norm over the last dimension of x (float32 or bfloat16), weight and bias (that dimension, x's dtype) or
// None. ATen's runs each call's rows on OpenMP's team; see engine/cpu.py (DecodeLayerNorm) for why that matters.
torch::Tensor layer_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight,
                         const c10::optional<torch::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "layer_norm: x (..., N), N > 0");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "layer_norm: x float32 or bfloat16, not ", x.scalar_type());
  const int64_t N = x.size(-1);
  const torch::Tensor xc = x.contiguous();
  auto kept = [&](const c10::optional<torch::Tensor>& t, const char* name) {
    if (!t.has_value()) return torch::Tensor();
    TORCH_CHECK(t->numel() == N && t->scalar_type() == x.scalar_type(), "layer_norm: ", name, " (", N,
                ",) in x's dtype");
    return t->contiguous();
  };
  const torch::Tensor w = kept(weight, "weight"), b = kept(bias, "bias");
  torch::Tensor y = torch::empty_like(xc);
  const int64_t M = xc.numel() / N;
  auto run = [&](auto element) {  // float, or uint16_t for bfloat16's bits
    using T = decltype(element);
    auto data = [](const torch::Tensor& t) { return t.defined() ? static_cast<const T*>(t.data_ptr()) : nullptr; };
    layer_norm_impl(data(xc), data(w), data(b), static_cast<T*>(y.data_ptr()), M, N, float(eps));
  };
  if (xc.scalar_type() == torch::kFloat32) run(float{});
  else run(uint16_t{});
  return y;
}

// The arguments of rows_int4 and dense_int4: an int4 weight as QuantLinear stores it, qweight uint8 (N, K / 2),
// scales and zeros bfloat16 (N, K / G), G even; x (..., K).
void check_int4(const char* op, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                const torch::Tensor& zeros, int64_t G) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kUInt8 && x.size(-1) == 2 * qweight.size(1), op,
              ": x (..., K), qweight uint8 (N, K / 2)");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  TORCH_CHECK(G > 1 && G % 2 == 0 && K % G == 0 && scales.sizes() == torch::IntArrayRef({N, K / G}) &&
                  zeros.sizes() == scales.sizes() && scales.scalar_type() == torch::kBFloat16 &&
                  zeros.scalar_type() == torch::kBFloat16,
              op, ": scales and zeros bfloat16 (N, K / group_size)");
}

torch::Tensor dense_int4(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                         const torch::Tensor& zeros, int64_t group_size);

// x (..., K) float32 or bfloat16 times an int4 weight as QuantLinear stores it: qweight uint8 (N, K / 2), scales
// and zeros bfloat16 (N, K / G) -> (..., N) float32. With AVX2 (K a multiple of 64, G 32 or a multiple of 64),
// int4_rows with x rounded to 8 bits per group; otherwise, or if x holds an inf or a nan, dense_int4 in float32.
torch::Tensor rows_int4(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                        const torch::Tensor& zeros, int64_t group_size) {
  check_int4("rows_int4", x, qweight, scales, zeros, group_size);
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1), G = group_size;
  // x as it comes if bfloat16 (the kernel widens it as it rounds it), else as float32
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor xc = bf16 ? x.reshape({-1, K}).contiguous() : x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xc.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
#ifdef YUNQUE_INT4
  if (K % 64 == 0 && (G == 32 || (G % 64 == 0 && G <= 256))) {
    // x's integers and scales, in buffers kept per thread (no allocation per call)
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> lane, sum, qsum;
    q.resize(M * K);
    lane.resize(M * K / 8);
    sum.resize(M * K / G);
    qsum.resize(M * K / G);
    const bool rounded =
        bf16 ? rows_to_int8_blocks(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, G, q.data(), lane.data(),
                                   sum.data(), qsum.data())
             : rows_to_int8_blocks(xc.data_ptr<float>(), M, K, G, q.data(), lane.data(), sum.data(), qsum.data());
    if (rounded) {
      const torch::Tensor w = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
      torch::Tensor y = torch::empty({M, N}, xc.options().dtype(torch::kFloat32));
      int4_rows(w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr()),
                reinterpret_cast<const uint16_t*>(z.data_ptr()), y.data_ptr<float>(), M, N, K, G, q.data(),
                lane.data(), sum.data(), qsum.data());
      return y.view(shape);
    }
  }
#endif
  return dense_int4(xc.to(torch::kFloat32), qweight, scales, zeros, G).view(shape);
}

// x (..., K) times an int4 weight as rows_int4 takes it, the weight widened (widen_int4) to x's dtype, bfloat16 or
// else float32, for the call: for many rows (a prompt), where a product of floats outruns int4_rows and ATen's.
// -> (..., N) in that dtype.
torch::Tensor dense_int4(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                         const torch::Tensor& zeros, int64_t group_size) {
  check_int4("dense_int4", x, qweight, scales, zeros, group_size);
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1), G = group_size;
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const torch::Tensor w = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr());
  const auto* zp = reinterpret_cast<const uint16_t*>(z.data_ptr());
  // The widened weight lives for the call only. A buffer kept per thread and reused spares the allocator's fresh
  // pages (a page fault per 4 KiB made the widening cost ~10x its arithmetic), up to SCRATCH_KEPT bytes: a larger
  // weight (an output head) is widened into memory of its own, freed after the call.
  constexpr int64_t SCRATCH_KEPT = int64_t(32) << 20;
  thread_local torch::Tensor scratch;
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const int64_t bytes = N * K * (bf16 ? 2 : 4);
  torch::Tensor dense;
  if (bytes <= SCRATCH_KEPT) {
    if (!scratch.defined() || scratch.numel() < bytes) {
      scratch = torch::empty({bytes}, x.options().dtype(torch::kUInt8));
    }
    dense = torch::from_blob(scratch.data_ptr(), {N, K}, x.options().dtype(dtype));
  } else {
    dense = torch::empty({N, K}, x.options().dtype(dtype));
  }
  if (bf16) {
    widen_int4(w.data_ptr<uint8_t>(), sp, zp, reinterpret_cast<uint16_t*>(dense.data_ptr()), N, K, G);
  } else {
    widen_int4(w.data_ptr<uint8_t>(), sp, zp, dense.data_ptr<float>(), N, K, G);
  }
  return torch::linear(x.to(dense.scalar_type()), dense);
}

// What both attention kernels ask of k and v (one dtype, unit stride on D, on the CPU), and each row's first key
// (pad as int64; undefined without pad).
static torch::Tensor checked_rows(const char* kernel, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, const c10::optional<torch::Tensor>& pad) {
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.dtype() == v.dtype(), kernel,
              ": k, v of one dtype, unit stride on D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), kernel, ": CPU tensors");
  torch::Tensor first;
  if (pad.has_value()) {
    first = pad->to(torch::kInt64).contiguous();
    TORCH_CHECK(first.numel() == q.size(0), kernel, ": pad needs one entry per row");
  }
  return first;
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
  const torch::Tensor first = checked_rows("decode_attention", q, k, v, pad);
  const torch::Tensor qc = q.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty(qc.sizes(), qc.options());
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

// Attention of a prompt's Tq queries (B, H, Tq, D) over k, v (B, K, S, D) of one dtype, float32 or bfloat16, the
// queries the last Tq positions, row b's keys from pad[b] (left padding; none if pad is None) -> (B, H, Tq, D) in
// k's dtype: see prompt_queries.
torch::Tensor prompt_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& pad, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(),
              "prompt_attention: q (B, H, T, D), k/v (B, K, S, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0 &&
                  q.size(2) <= k.size(2) && q.size(2) > 0,
              "prompt_attention: q ", q.sizes(), " does not match k ", k.sizes());
  const torch::Tensor first = checked_rows("prompt_attention", q, k, v, pad);
  const torch::Tensor qc = q.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty(q.sizes(), k.options());
  const int64_t* fp = first.defined() ? first.data_ptr<int64_t>() : nullptr;
  if (k.dtype() == torch::kFloat32) {
    dispatch_prompt<float>(qc, k, v, fp, out, scale);
  } else {
    TORCH_CHECK(k.dtype() == torch::kBFloat16, "prompt_attention: k, v float32 or bfloat16, not ", k.dtype());
    dispatch_prompt<uint16_t>(qc, k, v, fp, out, scale);
  }
  return out;
}

// One token per row of logits (B, V), float32 or bfloat16, drawn with u (B,) from softmax(logits * scale): see
// sample_rows_impl. int64 (B,), -1 for a row with an infinity or a NaN.
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& u, double scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && u.dim() == 1 && u.size(0) == logits.size(0),
              "sample_rows: logits (B, V) and u (B,), got ", logits.sizes(), " and ", u.sizes());
  TORCH_CHECK(logits.device().is_cpu() && u.device().is_cpu(), "sample_rows: CPU tensors");
  const torch::Tensor lc = logits.contiguous();
  const torch::Tensor uc = u.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kInt64));
  const int64_t B = lc.size(0), V = lc.size(1);
  if (lc.dtype() == torch::kFloat32) {
    sample_rows_impl(lc.data_ptr<float>(), uc.data_ptr<float>(), float(scale), out.data_ptr<int64_t>(), B, V);
  } else {
    TORCH_CHECK(lc.dtype() == torch::kBFloat16, "sample_rows: logits float32 or bfloat16, not ", lc.dtype());
    sample_rows_impl(reinterpret_cast<const uint16_t*>(lc.data_ptr()), uc.data_ptr<float>(), float(scale),
                     out.data_ptr<int64_t>(), B, V);
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

// The kernels, each as an operator of PyTorch's dispatcher (torch.ops.yunque.*) and as a binding of this module:
// one list, so that the two never differ.
#define YUNQUE_KERNELS(X) \
  X(rows_linear)          \
  X(rows_int4)            \
  X(dense_int4)           \
  X(decode_attention)     \
  X(prompt_attention)     \
  X(sample_rows)          \
  X(pack_pairs)           \
  X(pairs_linear)         \
  X(gelu_tanh)            \
  X(layer_norm)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_isa", &vector_isa, "the vector instructions of the integer kernels: avx512-vnni, avx512, avx2 or none");
  m.def("has_pairs", &has_pairs, "whether pairs_linear is built (AVX-512 BF16)");
  m.def("set_helpers", &pool::set_enabled,
        "whether the kernels' loops called from this thread run on the module's helper threads (true; Linux) or on "
        "OpenMP's team (false, the default); returns the previous setting");
  // The kernels for eager calls (engine/native.py, `kernels`). A call through torch.ops releases the GIL, runs, then
  // drops its stack's references to the arguments, and with torch 2.13 dropping the last one beside Python's takes
  // the GIL back for a moment (TensorImpl::decref_pyobject) before the call takes it back to return: two waits for
  // the GIL a call, while the server's event loop holds it. Here the GIL is released for the kernel only, and the
  // arguments are released after it is taken back: one wait.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
#define YUNQUE_BIND(name) m.def(#name, &name, nogil);
  YUNQUE_KERNELS(YUNQUE_BIND)
#undef YUNQUE_BIND
}

// The operators, so that a compiled decode step calls the kernels from its graph; their shapes for tracing are
// registered in engine/native.py.
TORCH_LIBRARY(yunque, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? scales) -> Tensor");
  m.def("rows_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("dense_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? pad, Tensor? filled, float scale) -> Tensor");
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? pad, float scale) -> Tensor");
  m.def("sample_rows(Tensor logits, Tensor u, float scale) -> Tensor");
  m.def("pack_pairs(Tensor weight) -> Tensor");
  m.def("pairs_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(yunque, CPU, m) {
#define YUNQUE_IMPL(name) m.impl(#name, &name);
  YUNQUE_KERNELS(YUNQUE_IMPL)
#undef YUNQUE_IMPL
}
