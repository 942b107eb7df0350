// Quantized matrix products on GGUF blocks, kept in their file layout (ggml-common.h):
//   block_q4_0 { half d; uint8 qs[16]; }          x = (q - 8) * d
//   block_q4_1 { half d; half m; uint8 qs[16]; }  x = q * d + m
//   block_q8_0 { half d; int8 qs[32]; }           x = q * d
// Low nibbles of qs hold elements 0-15 of a block, high nibbles 16-31.
//
// y[m, n] = sum_k x[m, k] * W[n, k]. Activations are quantized once per call to int16 with one fp32
// scale per 32-element block (relative error ~1.5e-5, far closer to fp32 than llama.cpp's int8), so
// each block's dot product is exact integer arithmetic: _mm256_madd_epi16 on AVX2, plain loops in
// the portable path. Rows of W are split over PyTorch's intra-op threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml type ids

int64_t block_bytes(int64_t t) {
  switch (t) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
  }
  TORCH_CHECK(false, "llamalite qmatmul: unsupported ggml type ", t, " (supported: Q4_0=2, Q4_1=3, Q8_0=8)");
}

inline float fp16_to_fp32(uint16_t h) {
  // IEEE half -> float without F16C, for the portable path.
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, f;
  if (exp == 0) {
    if (mant == 0) {
      f = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      f = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    f = sign | 0x7f800000u | (mant << 13);
  } else {
    f = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline uint16_t read_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

// One activation row, quantized: int16 values, and per 32-block the scale, the exact fp32 sum
// (for Q4_1's min term) and the integer sum (for Q4_0's -8 offset).
struct QRow {
  const int16_t* q;
  const float* scale;
  const float* sum;
  const int32_t* qsum;
  const int8_t* hi;   // q = 256 * hi + lo, for the byte-wise products of the 4-bit AVX2 path
  const uint8_t* lo;
};

void quantize_row(const float* x, int64_t k, int16_t* q, float* scale, float* sum, int32_t* qsum) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < 32; ++i) { amax = std::max(amax, std::fabs(xb[i])); s += xb[i]; }
    const float sc = amax / 32767.f;
    const float inv = sc > 0.f ? 1.f / sc : 0.f;
    int32_t qs = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      q[b * 32 + i] = static_cast<int16_t>(v);
      qs += v;
    }
    scale[b] = sc;
    sum[b] = s;
    qsum[b] = qs;
  }
}

// ----- portable path -------------------------------------------------------------------------------

float dot_ref(int64_t type, const uint8_t* w, const QRow& x, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int16_t* xq = x.q + b * 32;
    const uint8_t* blk = w + b * block_bytes(type);
    const float d = fp16_to_fp32(read_u16(blk));
    int32_t s = 0;
    if (type == Q8_0) {
      const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
      for (int i = 0; i < 32; ++i) s += qs[i] * xq[i];
      acc += d * x.scale[b] * s;
      continue;
    }
    const uint8_t* qs = blk + (type == Q4_1 ? 4 : 2);
    for (int i = 0; i < 16; ++i) s += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + 16];
    if (type == Q4_1) {
      acc += d * x.scale[b] * s + fp16_to_fp32(read_u16(blk + 2)) * x.sum[b];
    } else {
      acc += d * x.scale[b] * (s - 8 * x.qsum[b]);
    }
  }
  return acc;
}

// ----- AVX2 path ---------------------------------------------------------------------------------

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 packed bytes -> the block's 32 nibbles as two int16 vectors (elements 0-15, 16-31)
AVX2_TARGET inline void nibbles16(const uint8_t* qs, __m256i& lo, __m256i& hi) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0f);
  lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask));
  hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
}

AVX2_TARGET inline __m256i block_dot(__m256i w0, __m256i w1, const int16_t* xq) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));  // 8 int32 partial sums
}

// Two blocks a step with separate accumulators: one FMA chain would leave the loop waiting on its
// latency rather than on memory.
template <int64_t TYPE>
AVX2_TARGET inline void block_avx2(const uint8_t* blk, const QRow& x, int64_t b, __m256& acc, float& extra) {
  __m256i w0, w1;
  __m256i dot;
  if (TYPE == Q8_0) {
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
    dot = block_dot(w0, w1, x.q + b * 32);
  } else {
    // The 32 nibbles in one register (low nibbles in the low lane), multiplied byte-wise with the
    // activation's high and low bytes: q*x = 256*(q*hi) + q*lo, each pair sum fitting int16.
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (TYPE == Q4_1 ? 4 : 2)));
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + b * 32));
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + b * 32));
    const __m256i ph = _mm256_maddubs_epi16(nib, hi);  // unsigned nibble x signed high byte
    const __m256i pl = _mm256_maddubs_epi16(lo, nib);  // unsigned low byte x nibble (<= 15 as signed)
    dot = _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
  }
  (void)w0; (void)w1;
  const float ds = _cvtsh_ss(read_u16(blk)) * x.scale[b];
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ds), acc);
  if (TYPE == Q4_1) extra += _cvtsh_ss(read_u16(blk + 2)) * x.sum[b];
  if (TYPE == Q4_0) extra -= 8.f * ds * x.qsum[b];
}

template <int64_t TYPE, int64_t BB>
AVX2_TARGET float dot_avx2_t(const uint8_t* w, const QRow& x, int64_t nb) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float extra0 = 0.f, extra1 = 0.f;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    block_avx2<TYPE>(w + b * BB, x, b, acc0, extra0);
    block_avx2<TYPE>(w + (b + 1) * BB, x, b + 1, acc1, extra1);
  }
  if (b < nb) block_avx2<TYPE>(w + b * BB, x, b, acc0, extra0);
  return hsum(_mm256_add_ps(acc0, acc1)) + extra0 + extra1;
}

AVX2_TARGET float dot_avx2(int64_t type, const uint8_t* w, const QRow& x, int64_t nb) {
  switch (type) {
    case Q8_0: return dot_avx2_t<Q8_0, 34>(w, x, nb);
    case Q4_1: return dot_avx2_t<Q4_1, 20>(w, x, nb);
    default: return dot_avx2_t<Q4_0, 18>(w, x, nb);
  }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// ----- ops ---------------------------------------------------------------------------------------

// x: (M, K) fp32; w: (N, K/32 * block_bytes) uint8 -> (M, N) fp32
at::Tensor qmatmul_impl(const at::Tensor& x_in, const at::Tensor& w, int64_t type, bool use_simd) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "qmatmul: x must be (M, K) and w (N, bytes)");
  TORCH_CHECK(w.scalar_type() == at::kByte, "qmatmul: w must hold uint8 block bytes");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = wc.size(0), bb = block_bytes(type);
  TORCH_CHECK(K % 32 == 0 && wc.size(1) == K / 32 * bb, "qmatmul: w has ", wc.size(1),
              " bytes a row, but K=", K, " needs ", K / 32 * bb);
  const int64_t nb = K / 32;
  auto xq = at::empty({M, K}, at::kShort);
  auto scale = at::empty({M, nb}, at::kFloat), sum = at::empty({M, nb}, at::kFloat);
  auto qsum = at::empty({M, nb}, at::kInt);
  auto xhi = at::empty({M, K}, at::kChar);
  auto xlo = at::empty({M, K}, at::kByte);
  std::vector<QRow> rows(M);
  for (int64_t m = 0; m < M; ++m) {
    int16_t* q = xq.data_ptr<int16_t>() + m * K;
    quantize_row(x.data_ptr<float>() + m * K, K, q, scale.data_ptr<float>() + m * nb,
                 sum.data_ptr<float>() + m * nb, qsum.data_ptr<int32_t>() + m * nb);
    int8_t* hi = xhi.data_ptr<int8_t>() + m * K;
    uint8_t* lo = xlo.data_ptr<uint8_t>() + m * K;
    for (int64_t k = 0; k < K; ++k) {
      lo[k] = static_cast<uint8_t>(q[k] & 0xff);
      hi[k] = static_cast<int8_t>((q[k] - lo[k]) >> 8);
    }
    rows[m] = {q, scale.data_ptr<float>() + m * nb, sum.data_ptr<float>() + m * nb,
               qsum.data_ptr<int32_t>() + m * nb, hi, lo};
  }
  auto out = at::empty({M, N}, at::kFloat);
  float* y = out.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const bool simd = use_simd && has_avx2();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = wp + n * nb * bb;
      for (int64_t m = 0; m < M; ++m) {
        y[m * N + n] = simd ? dot_avx2(type, row, rows[m], nb) : dot_ref(type, row, rows[m], nb);
      }
    }
  });
  return out;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& w, int64_t type) { return qmatmul_impl(x, w, type, true); }

at::Tensor qmatmul_portable(const at::Tensor& x, const at::Tensor& w, int64_t type) {
  return qmatmul_impl(x, w, type, false);
}

// Dequantize (N, bytes) blocks to (N, K) fp32, for matrix-matrix work through fp32 GEMM.
at::Tensor dequantize(const at::Tensor& w, int64_t type) {
  const at::Tensor wc = w.contiguous();
  const int64_t bb = block_bytes(type), N = wc.size(0), nb = wc.size(1) / bb, K = nb * 32;
  auto out = at::empty({N, K}, at::kFloat);
  float* y = out.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  at::parallel_for(0, N * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* blk = wp + i * bb;
      float* o = y + i * 32;
      const float d = fp16_to_fp32(read_u16(blk));
      if (type == Q8_0) {
        const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) o[j] = qs[j] * d;
      } else if (type == Q4_1) {
        const float mn = fp16_to_fp32(read_u16(blk + 2));
        for (int j = 0; j < 16; ++j) {
          o[j] = (blk[4 + j] & 0x0f) * d + mn;
          o[j + 16] = (blk[4 + j] >> 4) * d + mn;
        }
      } else {
        for (int j = 0; j < 16; ++j) {
          o[j] = ((blk[2 + j] & 0x0f) - 8) * d;
          o[j + 16] = ((blk[2 + j] >> 4) - 8) * d;
        }
      }
    }
  });
  return out;
}

std::string simd_path() { return has_avx2() ? "avx2" : "portable"; }

}  // namespace

TORCH_LIBRARY(llamalite, m) {
  m.def("qmatmul(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("qmatmul_portable(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("dequantize(Tensor w, int qtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalite, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_portable", &qmatmul_portable);
  m.impl("dequantize", &dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("simd_path", &simd_path); }
