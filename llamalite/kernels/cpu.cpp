// llamalite's CPU kernels. Most of this file: quantized matrix products on GGUF block formats
// (ggml-common.h):
//   block_q4_0 { half d; uint8 qs[16]; }          x = (q - 8) * d
//   block_q4_1 { half d; half m; uint8 qs[16]; }  x = q * d + m
//   block_q8_0 { half d; int8 qs[32]; }           x = q * d
//   block_q4_K { half d, dmin; uint8 scales[12]; uint8 qs[128]; }  256 elements: 8 blocks of 32,
//                                                  x = q * d * scale_j - dmin * min_j (6-bit scale_j, min_j)
//   block_q6_K { uint8 ql[128], qh[64]; int8 scales[16]; half d; }  256 elements, 6-bit q:
//                                                  x = (q - 32) * d * scales[element / 16]
// Low nibbles of qs hold elements 0-15 of a block, high nibbles 16-31 (K-quants: after the repack).
//
// At load, each weight row is repacked once from the file's array of blocks into a structure of
// arrays: [d of every block][m of every block, Q4_1][qs of every block] (K-quants: see Packed). The row
// keeps its size; the scales of 8 consecutive blocks then convert with one instruction, and the
// kernel reduces 8 blocks' integer dot products together instead of paying a scale multiply per block.
//
// y[m, n] = sum_k x[m, k] * W[n, k]. Activations are quantized once per call to int16 with one fp32
// scale per 32-element block (relative error ~1.5e-5, far closer to fp32 than llama.cpp's int8), so
// each block's dot product is exact integer arithmetic. The 4-bit AVX2 path splits each int16 into a
// signed high byte and an unsigned low byte and uses byte multiplies (q*x = 256*q*hi + q*lo, each
// pair sum fitting int16). Rows of W are split over PyTorch's intra-op threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <immintrin.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };  // ggml type ids

// Every type is handled in blocks of 32 elements here. A Q4_K super-block (256 elements, 144 bytes: d
// and dmin as fp16, eight 6-bit scales and mins in 12 bytes, 128 bytes of nibbles) counts as eight
// blocks whose scale is d * scale_j and min -dmin * min_j. A Q6_K super-block (256 elements, 210
// bytes: 6-bit values less 32, an int8 scale per 16 elements, d) as eight blocks with two scales
// each, d * scale for elements 0-15 and for 16-31.
inline bool k_quant(int64_t t) { return t == Q4_K || t == Q6_K; }
inline int64_t elements_per_row_unit(int64_t t) { return k_quant(t) ? 256 : 32; }  // what K must divide by

// Bytes of a block, or of a K-quant's super-block.
int64_t unit_bytes(int64_t t) {
  switch (t) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q6_K: return 210;
  }
  TORCH_CHECK(false, "llamalite: unsupported ggml type ", t,
              " (supported: Q4_0=2, Q4_1=3, Q8_0=8, Q4_K=12, Q6_K=14)");
}

// Bytes of a row of nb 32-element blocks, and blocks of a row of so many bytes.
inline int64_t row_bytes(int64_t t, int64_t nb) { return nb * 32 / elements_per_row_unit(t) * unit_bytes(t); }
inline int64_t row_blocks(int64_t t, int64_t bytes) { return bytes / unit_bytes(t) * elements_per_row_unit(t) / 32; }

inline int64_t quant_bytes(int64_t t) { return t == Q8_0 ? 32 : 16; }  // qs bytes a block
inline int64_t scale_fields(int64_t t) { return t == Q4_1 ? 2 : 1; }  // halves a block: d (and m)

// A repacked row: nb scales d, nb mins m (Q4_1), then nb blocks of qs. Q4_K: per super-block d, then
// dmin, then its 12 bytes of scales and mins (sc), then the blocks' qs; each block's qs in Q4_0's
// nibble order (byte i: element i low, i + 16 high) where the file keeps elements 0-31 of a 64-element
// chunk in the low nibbles of its 32 bytes and 32-63 in the high ones. Q6_K: per super-block d, then
// its 16 scales (sc: those of the blocks' elements 0-15, then of 16-31), then the top 2 bits of its
// values (hb, 64 bytes), then the low 4 bits as qs in Q4_0's nibble order. In hb a super-block's two
// quads of blocks take 32 bytes each: byte k of the first 16 holds, in bits 2t and 2t+1, the top bits
// of element k of the quad's block t, byte k of the next 16 those of element 16 + k.
struct Packed {
  const uint16_t* d;
  const uint16_t* m;
  const uint8_t* qs;
  const uint8_t* sc;
  const uint8_t* hb;
};

inline Packed packed_row(int64_t type, const uint8_t* row, int64_t nb) {
  const uint16_t* d = reinterpret_cast<const uint16_t*>(row);
  const int64_t ns = nb / 8;
  if (type == Q4_K) return {d, d + ns, row + 16 * ns, row + 4 * ns, nullptr};
  if (type == Q6_K) return {d, nullptr, row + 82 * ns, row + 2 * ns, row + 18 * ns};
  return {d, d + nb, row + 2 * nb * scale_fields(type), nullptr, nullptr};
}

// Q4_K's eight 6-bit scales and mins of a super-block, as bytes in two words, from its 12 bytes: bytes
// 0-3 hold scales 0-3 and 4-7 mins 0-3 in their low 6 bits; bytes 8-11 the low 4 bits of scales 4-7
// (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of bytes 0-3 and 4-7.
inline void k4_scales(const uint8_t* q, uint64_t& sc, uint64_t& mn) {
  uint32_t u0, u1, u2;
  std::memcpy(&u0, q, 4);
  std::memcpy(&u1, q + 4, 4);
  std::memcpy(&u2, q + 8, 4);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  sc = (u0 & low6) | static_cast<uint64_t>((u2 & low4) | (((u0 >> 6) & low2) << 4)) << 32;
  mn = (u1 & low6) | static_cast<uint64_t>(((u2 >> 4) & low4) | (((u1 >> 6) & low2) << 4)) << 32;
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

// One activation row, quantized: int16 values and their byte split, and per 32-block the scale,
// the exact fp32 sum (Q4_1's min term) and the integer sum (Q4_0's -8 offset).
struct QRow {
  const int16_t* q;
  const int8_t* hi;  // q = 256 * hi + lo
  const uint8_t* lo;
  const float* scale;
  const float* sum;
  const int32_t* qsum;
  const int32_t* qsum16;  // the integer sum of each block's elements 0-15 (Q6_K's -32 offset)
};

// Where element i of block b goes in the byte arrays (hi, lo) of a quantized activation row of nb
// blocks. Blocks group in fours (4q .. 4q+3): a quad's 128 bytes are its blocks' elements 0-15, block
// after block, then their elements 16-31. That is the order of the nibbles in one 64-byte load of the
// four blocks' weights (low nibbles, then high nibbles, 16 bytes a block), so a quad unpacks with one
// shift and two masks, and each half of it is 32 bytes of pair (2p, 2p+1) for 256-bit registers.
// After the last full quad, a pair of blocks takes the same order in 64 bytes; a last odd block stays
// in order.
inline int64_t byte_slot(int64_t b, int64_t i, int64_t nb) {
  const int64_t quads = nb / 4 * 4;
  if (b < quads) return (b / 4) * 128 + (i < 16 ? 0 : 64) + (b % 4) * 16 + (i % 16);
  if (b < quads + (nb - quads) / 2 * 2) return quads * 32 + (i < 16 ? 0 : 32) + (b - quads) * 16 + (i % 16);
  return b * 32 + i;
}

// Pair (b, b+1) of a quantized activation row, b even: its first byte in hi and lo, and how far its
// elements 16-31 lie from its elements 0-15 (byte_slot).
inline int64_t pair_half(int64_t b, int64_t nb) { return b < nb / 4 * 4 ? 64 : 32; }
inline int64_t pair_start(int64_t b, int64_t nb) { return b < nb / 4 * 4 ? (b / 4) * 128 + (b % 4) * 16 : b * 32; }

void quantize_row(const float* x, int64_t k, int16_t* q, int8_t* hi, uint8_t* lo, float* scale, float* sum,
                  int32_t* qsum, int32_t* qsum16) {
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
      const int64_t at = byte_slot(b, i, k / 32);
      lo[at] = static_cast<uint8_t>(v & 0xff);
      hi[at] = static_cast<int8_t>((v - (v & 0xff)) >> 8);
      qs += v;
      if (i == 15) qsum16[b] = qs;
    }
    scale[b] = sc;
    sum[b] = s;
    qsum[b] = qs;
  }
}

// ----- portable path -------------------------------------------------------------------------------

int32_t block_dot_ref(int64_t type, const uint8_t* qs, const int16_t* xq) {
  int32_t s = 0;
  if (type == Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(qs);
    for (int i = 0; i < 32; ++i) s += q[i] * xq[i];
  } else {
    for (int i = 0; i < 16; ++i) s += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + 16];
  }
  return s;
}

// Block b's scale d and min m as fp32: its elements are q * d + m (Q4_0: m = -8 * d; Q8_0: m = 0).
inline void block_scale_min(int64_t type, const Packed& w, int64_t b, float& d, float& m) {
  if (type == Q4_K) {
    uint64_t sc, mn;
    k4_scales(w.sc + 12 * (b / 8), sc, mn);
    d = fp16_to_fp32(w.d[b / 8]) * static_cast<float>((sc >> (8 * (b % 8))) & 0xff);
    m = -fp16_to_fp32(w.m[b / 8]) * static_cast<float>((mn >> (8 * (b % 8))) & 0xff);
    return;
  }
  d = fp16_to_fp32(w.d[b]);
  m = type == Q4_1 ? fp16_to_fp32(w.m[b]) : type == Q4_0 ? -8.f * d : 0.f;
}

inline bool has_min(int64_t type) { return type == Q4_1 || type == Q4_K; }  // a min term: m * sum(x)

// Q6_K: element i of block b as stored (0-63; its value is (q - 32) times q6_scale), and the scale
// d * scale of the block's elements 0-15 (half 0) or 16-31 (half 1).
inline int q6_value(const Packed& w, int64_t b, int i) {
  const int nib = i < 16 ? w.qs[16 * b + i] & 0x0f : w.qs[16 * b + i - 16] >> 4;
  const uint8_t top = w.hb[64 * (b / 8) + 32 * (b % 8 / 4) + 16 * (i / 16) + i % 16];
  return nib | (((top >> (2 * (b % 4))) & 3) << 4);
}
inline float q6_scale(const Packed& w, int64_t b, int half) {
  return fp16_to_fp32(w.d[b / 8]) * static_cast<float>(static_cast<int8_t>(w.sc[16 * (b / 8) + 8 * half + b % 8]));
}

float dot_ref(int64_t type, const Packed& w, const QRow& x, int64_t nb) {
  float acc = 0.f;
  const int64_t qb = quant_bytes(type);
  for (int64_t b = 0; type == Q6_K && b < nb; ++b) {
    int32_t s[2] = {0, 0};
    for (int i = 0; i < 32; ++i) s[i / 16] += (q6_value(w, b, i) - 32) * x.q[b * 32 + i];
    acc += q6_scale(w, b, 0) * x.scale[b] * s[0] + q6_scale(w, b, 1) * x.scale[b] * s[1];
  }
  for (int64_t b = 0; type != Q6_K && b < nb; ++b) {
    int32_t s = block_dot_ref(type, w.qs + b * qb, x.q + b * 32);
    if (type == Q4_0) s -= 8 * x.qsum[b];
    float d, m;
    block_scale_min(type, w, b, d, m);
    acc += d * x.scale[b] * s;
    if (has_min(type)) acc += m * x.sum[b];
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

// quantize_row on AVX2: the same int16 values, bytes, scales and integer sums; the fp32 sums (Q4_1's
// min term) add in another order, 8 lanes and then across them.
AVX2_TARGET void quantize_row_avx2(const float* x, int64_t k, int16_t* q, int8_t* hi, uint8_t* lo, float* scale,
                                   float* sum, int32_t* qsum, int32_t* qsum16) {
  const int64_t nb = k / 32, paired = nb / 2 * 2;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i ff = _mm256_set1_epi16(0xff);
  for (int64_t b = 0; b < nb; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + b * 32 + 8 * i);
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float sc = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 32767.f;
    const __m256 inv = _mm256_set1_ps(sc > 0.f ? 1.f / sc : 0.f);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearbyint
    // packs interleaves the 128-bit lanes; the permute puts elements back in order
    const __m256i q0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xd8);  // elements 0-15
    const __m256i q1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2], qi[3]), 0xd8);  // 16-31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), q0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32 + 16), q1);
    const __m256i lb = _mm256_permute4x64_epi64(
        _mm256_packus_epi16(_mm256_and_si256(q0, ff), _mm256_and_si256(q1, ff)), 0xd8);  // v & 0xff
    const __m256i hb = _mm256_permute4x64_epi64(
        _mm256_packs_epi16(_mm256_srai_epi16(q0, 8), _mm256_srai_epi16(q1, 8)), 0xd8);  // v >> 8
    if (b < paired) {  // byte_slot: elements 0-15 and 16-31 go half a quad (or a pair) apart
      const int64_t at = byte_slot(b, 0, nb), half = byte_slot(b, 16, nb) - at;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at), _mm256_castsi256_si128(lb));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at + half), _mm256_extracti128_si256(lb, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at), _mm256_castsi256_si128(hb));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at + half), _mm256_extracti128_si256(hb, 1));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + b * 32), lb);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + b * 32), hb);
    }
    scale[b] = sc;
    sum[b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    const __m256i q01 = _mm256_add_epi32(qi[0], qi[1]), q23 = _mm256_add_epi32(qi[2], qi[3]);
    __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(q01), _mm256_extracti128_si256(q01, 1));
    __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(q23), _mm256_extracti128_si256(q23, 1));
    q4 = _mm_hadd_epi32(q4, h4);  // [lo lo hi hi]
    q4 = _mm_hadd_epi32(q4, q4);  // [lo hi lo hi]
    qsum16[b] = _mm_cvtsi128_si32(q4);
    qsum[b] = qsum16[b] + _mm_extract_epi32(q4, 1);
  }
}

// A block's weights made ready for products, once for every activation row: Q8_0's 32 int8 widened
// to int16 (two registers), or a 4-bit block's 32 nibbles in one register (elements 0-15 in the low lane).
struct Unpacked {
  __m256i a, b;
};

template <int64_t TYPE>
AVX2_TARGET inline Unpacked unpack_avx2(const uint8_t* qs) {
  if (TYPE == Q8_0) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)))};
  }
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return {_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f)), _mm256_setzero_si256()};
}

// One block's dot product with activation row x as 8 int32 partial sums.
template <int64_t TYPE>
AVX2_TARGET inline __m256i block_dot_avx2(const Unpacked& w, const QRow& x, int64_t b) {
  if (TYPE == Q8_0) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * 32));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * 32 + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(w.a, x0), _mm256_madd_epi16(w.b, x1));
  }
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + b * 32));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + b * 32));
  const __m256i ph = _mm256_maddubs_epi16(w.a, hi);  // unsigned nibble x signed high byte
  const __m256i pl = _mm256_maddubs_epi16(lo, w.a);  // unsigned low byte x nibble (<= 15 as signed)
  return _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
}

// Two consecutive 4-bit blocks in two registers: a = both blocks' elements 0-15 (block 2p in the low
// lane), b = their elements 16-31: the byte order of a quantized row's pairs (byte_slot).
AVX2_TARGET inline Unpacked unpack_pair_avx2(const uint8_t* qs) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  return {_mm256_and_si256(q, mask), _mm256_and_si256(_mm256_srli_epi16(q, 4), mask)};
}

// A pair's dot products with activation row x: [block 2p's 4 partial sums | block 2p+1's]. Byte
// products as block_dot_avx2; the two halves' 16-bit sums are added before widening (each stays
// below 2^15: 4 products of at most 15 x 255, or of 15 x 128).
AVX2_TARGET inline __m256i pair_dot_avx2(const Unpacked& w, const QRow& x, int64_t b, int64_t nb) {
  const int64_t o = pair_start(b, nb), h = pair_half(b, nb);
  const __m256i hi0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + o));
  const __m256i hi1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + o + h));
  const __m256i lo0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + o));
  const __m256i lo1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + o + h));
  const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(w.a, hi0), _mm256_maddubs_epi16(w.b, hi1));
  const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, w.a), _mm256_maddubs_epi16(lo1, w.b));
  return _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
}

constexpr int64_t MAX_ROWS = 8;  // activation rows a weight row is unpacked for at once
// The dot products prefetch their weights GEMV_PREFETCH bytes ahead, into the rows after theirs:
// the hardware's prefetch alone let one thread stream 16 GB/s from memory where a plain read loop
// does 42 (Q4_0, 4096-wide rows); 1 KB ahead 17, 4 KB ahead 22, two threads 34 -> 43 GB/s. A row is
// prefetched as one stream, each group of 8 blocks its share of the row's bytes: prefetching only
// the qs ahead covered 61% of a Q6_K row (128 of a super-block's 210 bytes), and one thread read it
// from memory at half its in-cache rate.
constexpr int64_t GEMV_PREFETCH = 4096;

// Eight consecutive 4-bit blocks unpacked on AVX2 (four pairs), and their integer dot products with
// an activation row: the eight blocks' sums in order. The pairs' partial sums are reduced by
// horizontal adds (blocks 0 2 4 6 | 1 3 5 7), then put in order.
struct Eight4Avx2 {
  Unpacked u[4];
  AVX2_TARGET static Eight4Avx2 load(const uint8_t* qs) {
    Eight4Avx2 g;
    for (int j = 0; j < 4; ++j) g.u[j] = unpack_pair_avx2(qs + 32 * j);
    return g;
  }
  // Four pairs' partial sums ([block 2p's 4 | block 2p+1's 4] each) -> the eight blocks' sums in order.
  AVX2_TARGET static __m256i in_order(const __m256i* p) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    return _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  AVX2_TARGET __m256i dot(const QRow& x, int64_t b, int64_t nb) const {
    __m256i p[4];
    for (int j = 0; j < 4; ++j) p[j] = pair_dot_avx2(u[j], x, b + 2 * j, nb);
    return in_order(p);
  }
};

// Q6_K's top 2 bits of two blocks of a quad (t0, t0 + 1), from the quad's 16 bytes of them for one
// half of each block, at bits 4-5 of the bytes of a pair register (Unpacked's a or b).
AVX2_TARGET inline __m256i six_top_avx2(const uint8_t* hb, int t0) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hb)));
  const __m256i shifted = _mm256_srlv_epi32(v, _mm256_setr_epi32(2 * t0, 2 * t0, 2 * t0, 2 * t0, 2 * t0 + 2,
                                                                  2 * t0 + 2, 2 * t0 + 2, 2 * t0 + 2));
  return _mm256_and_si256(_mm256_slli_epi32(shifted, 4), _mm256_set1_epi8(0x30));
}

// Eight Q6_K blocks (a super-block) on AVX2: four pairs of 6-bit values (nibbles and top bits), and
// their integer dot products with an activation row as two sums a block, of elements 0-15 and 16-31.
struct Eight6Avx2 {
  Unpacked u[4];
  AVX2_TARGET static Eight6Avx2 load(const uint8_t* qs, const uint8_t* hb) {
    Eight6Avx2 g;
    for (int j = 0; j < 4; ++j) {
      g.u[j] = unpack_pair_avx2(qs + 32 * j);
      g.u[j].a = _mm256_or_si256(g.u[j].a, six_top_avx2(hb + 32 * (j / 2), 2 * (j % 2)));
      g.u[j].b = _mm256_or_si256(g.u[j].b, six_top_avx2(hb + 32 * (j / 2) + 16, 2 * (j % 2)));
    }
    return g;
  }
  // 256 * (q . hi) + q . lo of one half of a pair: [block 2p's 4 partial sums | block 2p+1's]
  AVX2_TARGET static __m256i half(const __m256i& q, const QRow& x, int64_t o) {
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + o));
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + o));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, hi), _mm256_set1_epi16(256)),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(lo, q), _mm256_set1_epi16(1)));
  }
  AVX2_TARGET void dot(const QRow& x, int64_t b, int64_t nb, __m256i& lo, __m256i& hi) const {
    __m256i pl[4], ph[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t o = pair_start(b + 2 * j, nb), h = pair_half(b + 2 * j, nb);
      pl[j] = half(u[j].a, x, o);
      ph[j] = half(u[j].b, x, o + h);
    }
    lo = Eight4Avx2::in_order(pl);
    hi = Eight4Avx2::in_order(ph);
  }
};

// Dot products of one weight row with M <= MAX_ROWS activation rows, y[m * ystride] (or added to it:
// add, a residual connection folded into the product that feeds it), on one ISA,
// from that ISA's one-block and one-pair dot products and its EIGHT4 (eight 4-bit blocks at once).
// Eight blocks are unpacked once for all rows; for each row, their integer sums come out in order and
// are scaled by eight scales at once, then come the blocks that do not fill a group of eight. Each
// block's sum is exact, and each row goes through the same operations in the same order whatever M
// is, so a row's result depends neither on its batch nor on the ISA. Stamped out once per ISA: each
// copy must be compiled for its own instruction set, so a template alone cannot share it.
#define LLAMALITE_DEFINE_DOT(TARGET, BLOCK_DOT, PAIR_DOT, EIGHT4, EIGHT6, NAME)                        \
  template <int64_t TYPE>                                                                              \
  TARGET inline __m256i NAME##_8(const Unpacked* u, const QRow& x, int64_t b) { /* Q8_0 */             \
    const __m256i h01 = _mm256_hadd_epi32(BLOCK_DOT<TYPE>(u[0], x, b), BLOCK_DOT<TYPE>(u[1], x, b + 1)); \
    const __m256i h23 = _mm256_hadd_epi32(BLOCK_DOT<TYPE>(u[2], x, b + 2), BLOCK_DOT<TYPE>(u[3], x, b + 3)); \
    const __m256i u0 = _mm256_hadd_epi32(h01, h23);                                                    \
    const __m256i h45 = _mm256_hadd_epi32(BLOCK_DOT<TYPE>(u[4], x, b + 4), BLOCK_DOT<TYPE>(u[5], x, b + 5)); \
    const __m256i h67 = _mm256_hadd_epi32(BLOCK_DOT<TYPE>(u[6], x, b + 6), BLOCK_DOT<TYPE>(u[7], x, b + 7)); \
    const __m256i u1 = _mm256_hadd_epi32(h45, h67);                                                    \
    /* u0 = [b0 b1 b2 b3 | b0 b1 b2 b3]: each block's sum split over the two 128-bit lanes */          \
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31)); \
  }                                                                                                    \
  /* adds block t's contribution from its integer dot product: scales, Q4_0's offset or Q4_1's min */ \
  template <int64_t TYPE>                                                                              \
  TARGET inline void NAME##_add_block(float& tail, const Packed& w, const QRow& x, int64_t t, int32_t tot) { \
    if (TYPE == Q4_0) tot -= 8 * x.qsum[t];                                                            \
    tail += _cvtsh_ss(w.d[t]) * x.scale[t] * tot;                                                      \
    if (TYPE == Q4_1) tail += _cvtsh_ss(w.m[t]) * x.sum[t];                                            \
  }                                                                                                    \
  template <int64_t TYPE, int64_t M>                                                                   \
  TARGET void NAME(const Packed& w, const QRow* xs, int64_t nb, float* y, int64_t ystride, bool add) { \
    constexpr int64_t QB = TYPE == Q8_0 ? 32 : 16;                                                     \
    const int64_t group_bytes = row_bytes(TYPE, 8);                                                    \
    __m256 acc[MAX_ROWS], macc[MAX_ROWS];                                                              \
    for (int64_t m = 0; m < M; ++m) acc[m] = macc[m] = _mm256_setzero_ps();                            \
    int64_t b = 0;                                                                                     \
    for (; b + 8 <= nb; b += 8) {                                                                      \
      { /* the row's bytes as one stream: a group's share of them (scales, qs, ...) 4 KB ahead */      \
        const char* ahead = reinterpret_cast<const char*>(w.d) + b / 8 * group_bytes + GEMV_PREFETCH;  \
        for (int64_t l = 0; l < group_bytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);            \
      }                                                                                                \
      if (TYPE == Q6_K) { /* one super-block, two scales a block: elements 0-15's and 16-31's */      \
        const EIGHT6 g6 = EIGHT6::load(w.qs + b * QB, w.hb + 8 * b);                                   \
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(w.d[b / 8]));                                        \
        const __m256 dl = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                       \
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.sc + 2 * b)))), d);                     \
        const __m256 dh = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                       \
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.sc + 2 * b + 8)))), d);                 \
        for (int64_t m = 0; m < M; ++m) {                                                              \
          const QRow& x = xs[m];                                                                       \
          __m256i tl, th;                                                                              \
          g6.dot(x, b, nb, tl, th);                                                                    \
          const __m256i q16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qsum16 + b));      \
          const __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qsum + b));        \
          tl = _mm256_sub_epi32(tl, _mm256_slli_epi32(q16, 5)); /* (q - 32) . x */                    \
          th = _mm256_sub_epi32(th, _mm256_slli_epi32(_mm256_sub_epi32(q32, q16), 5));                 \
          const __m256 xsc = _mm256_loadu_ps(x.scale + b);                                             \
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl), _mm256_mul_ps(dl, xsc), acc[m]);            \
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th), _mm256_mul_ps(dh, xsc), acc[m]);            \
        }                                                                                              \
        continue;                                                                                      \
      }                                                                                                \
      Unpacked u[8];                                                                                   \
      EIGHT4 g;                                                                                        \
      if (TYPE == Q8_0) {                                                                              \
        for (int j = 0; j < 8; ++j) u[j] = unpack_avx2<TYPE>(w.qs + (b + j) * QB);                     \
      } else {                                                                                         \
        g = EIGHT4::load(w.qs + b * QB);                                                               \
      }                                                                                                \
      __m256 d, mn = _mm256_setzero_ps(); /* the 8 blocks' scales and mins */                            \
      if (TYPE == Q4_K) { /* one super-block: d * scale_j, -dmin * min_j */                           \
        uint64_t sc, mq;                                                                               \
        k4_scales(w.sc + 12 * (b / 8), sc, mq);                                                        \
        d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc))),             \
                          _mm256_set1_ps(_cvtsh_ss(w.d[b / 8])));                                      \
        mn = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mq))),            \
                           _mm256_set1_ps(-_cvtsh_ss(w.m[b / 8])));                                    \
      } else {                                                                                         \
        d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + b)));               \
        if (TYPE == Q4_1) mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + b))); \
      }                                                                                                \
      for (int64_t m = 0; m < M; ++m) {                                                                \
        const QRow& x = xs[m];                                                                         \
        __m256i tot = TYPE == Q8_0 ? NAME##_8<TYPE>(u, x, b) : g.dot(x, b, nb);                        \
        if (TYPE == Q4_0) { /* (q - 8) . x = q . x - 8 * sum(x) */                                      \
          tot = _mm256_sub_epi32(tot, _mm256_slli_epi32(                                               \
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qsum + b)), 3));                   \
        }                                                                                              \
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(d, _mm256_loadu_ps(x.scale + b)), acc[m]); \
        if (TYPE == Q4_1 || TYPE == Q4_K) macc[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(x.sum + b), macc[m]); \
      }                                                                                                \
    }                                                                                                  \
    for (int64_t m = 0; m < M; ++m) {                                                                  \
      const QRow& x = xs[m];                                                                           \
      float tail = 0.f;                                                                                \
      int64_t t = b;                                                                                   \
      constexpr bool TAIL = TYPE != Q4_K && TYPE != Q6_K; /* K-quant rows are whole groups of 8 */      \
      for (; TAIL && TYPE != Q8_0 && t + 2 <= nb; t += 2) { /* pairs after the groups of 8 */          \
        __m256i h = PAIR_DOT(unpack_pair_avx2(w.qs + t * QB), x, t, nb);                               \
        h = _mm256_hadd_epi32(h, h);                                                                   \
        h = _mm256_hadd_epi32(h, h); /* [block t's sum x4 | block t+1's x4] */                         \
        NAME##_add_block<TYPE>(tail, w, x, t, _mm256_cvtsi256_si32(h));                                \
        NAME##_add_block<TYPE>(tail, w, x, t + 1, _mm_cvtsi128_si32(_mm256_extracti128_si256(h, 1))); \
      }                                                                                                \
      for (; TAIL && t < nb; ++t) {                                                                    \
        const __m256i s = BLOCK_DOT<TYPE>(unpack_avx2<TYPE>(w.qs + t * QB), x, t);                     \
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));          \
        h = _mm_hadd_epi32(h, h);                                                                      \
        h = _mm_hadd_epi32(h, h);                                                                      \
        NAME##_add_block<TYPE>(tail, w, x, t, _mm_cvtsi128_si32(h));                                   \
      }                                                                                                \
      const float r = hsum(_mm256_add_ps(acc[m], macc[m])) + tail;                                    \
      y[m * ystride] = add ? y[m * ystride] + r : r;                                                   \
    }                                                                                                  \
  }                                                                                                    \
  /* M as a constant: each batch size compiles to its own copy, accumulators in registers (with M a */ \
  /* variable they lived on the stack: 1.4-1.6x slower) */                                            \
  template <int64_t TYPE>                                                                              \
  TARGET void NAME##_rows(const Packed& w, const QRow* xs, int64_t M, int64_t nb, float* y, int64_t ystride, \
                          bool add) {                                                                  \
    switch (M) {                                                                                       \
      case 1: return NAME<TYPE, 1>(w, xs, nb, y, ystride, add);                                        \
      case 2: return NAME<TYPE, 2>(w, xs, nb, y, ystride, add);                                        \
      case 3: return NAME<TYPE, 3>(w, xs, nb, y, ystride, add);                                        \
      case 4: return NAME<TYPE, 4>(w, xs, nb, y, ystride, add);                                        \
      case 5: return NAME<TYPE, 5>(w, xs, nb, y, ystride, add);                                        \
      case 6: return NAME<TYPE, 6>(w, xs, nb, y, ystride, add);                                        \
      case 7: return NAME<TYPE, 7>(w, xs, nb, y, ystride, add);                                        \
      default: return NAME<TYPE, 8>(w, xs, nb, y, ystride, add);                                       \
    }                                                                                                  \
  }                                                                                                    \
  TARGET void NAME##_any(int64_t type, const Packed& w, const QRow* xs, int64_t M, int64_t nb, float* y, \
                         int64_t ystride, bool add) {                                                  \
    switch (type) {                                                                                    \
      case Q8_0: return NAME##_rows<Q8_0>(w, xs, M, nb, y, ystride, add);                              \
      case Q4_1: return NAME##_rows<Q4_1>(w, xs, M, nb, y, ystride, add);                              \
      case Q4_K: return NAME##_rows<Q4_K>(w, xs, M, nb, y, ystride, add);                              \
      case Q6_K: return NAME##_rows<Q6_K>(w, xs, M, nb, y, ystride, add);                              \
      default: return NAME##_rows<Q4_0>(w, xs, M, nb, y, ystride, add);                               \
    }                                                                                                  \
  }

LLAMALITE_DEFINE_DOT(AVX2_TARGET, block_dot_avx2, pair_dot_avx2, Eight4Avx2, Eight6Avx2, dot_avx2)

// ----- AVX-512 VNNI path ----------------------------------------------------------------------------
// vpdpbusd multiplies unsigned by signed bytes and accumulates four products into each int32 lane:
// two multiplies a 4-bit block instead of four, no widening step. Groups of eight 4-bit blocks run on
// 512-bit registers (Eight4Vnni), pairs and single blocks on 256-bit ones.

#define VNNI_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

template <int64_t TYPE>
VNNI_TARGET inline __m256i block_dot_vnni(const Unpacked& w, const QRow& x, int64_t b) {
  if (TYPE == Q8_0) return block_dot_avx2<TYPE>(w, x, b);  // int8 weights: int16 products either way
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + b * 32));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + b * 32));
  const __m256i ph = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.a, hi);
  return _mm256_dpbusd_epi32(_mm256_slli_epi32(ph, 8), lo, w.a);  // 256 * (q . hi) + q . lo
}

// A pair as pair_dot_avx2, on vpdpbusd: 256 * (q . hi) + q . lo, both halves accumulated in place.
VNNI_TARGET inline __m256i pair_dot_vnni(const Unpacked& w, const QRow& x, int64_t b, int64_t nb) {
  const int64_t o = pair_start(b, nb), h = pair_half(b, nb);
  const __m256i hi0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + o));
  const __m256i hi1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + o + h));
  const __m256i lo0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + o));
  const __m256i lo1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + o + h));
  const __m256i ph = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w.a, hi0), w.b, hi1);
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(ph, 8), lo0, w.a), lo1, w.b);
}

// Eight 4-bit blocks on 512-bit registers: two quads, each one 64-byte load of weights whose low
// nibbles meet the quad's first 64 activation bytes and high nibbles its last 64 (byte_slot). A quad
// takes four vpdpbusd; its 16 lanes hold 4 partial sums a block, reduced with the other quad's in
// three steps to the eight blocks' sums in order (the same integers as Eight4Avx2's).
struct Eight4Vnni {
  __m512i l0, h0, l1, h1;  // quad 0's low and high nibbles, quad 1's
  VNNI_TARGET static Eight4Vnni load(const uint8_t* qs) {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    const __m512i q0 = _mm512_loadu_si512(qs), q1 = _mm512_loadu_si512(qs + 64);
    return {_mm512_and_si512(q0, mask), _mm512_and_si512(_mm512_srli_epi16(q0, 4), mask), _mm512_and_si512(q1, mask),
            _mm512_and_si512(_mm512_srli_epi16(q1, 4), mask)};
  }
  // 256 * (q . hi) + q . lo over one quad, its first activation byte at o; hi and lo chains apart
  VNNI_TARGET static __m512i quad(const __m512i& l, const __m512i& h, const QRow& x, int64_t o) {
    const __m512i z = _mm512_setzero_si512();
    const __m512i ph = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, l, _mm512_loadu_si512(x.hi + o)), h,
                                           _mm512_loadu_si512(x.hi + o + 64));
    const __m512i pl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, _mm512_loadu_si512(x.lo + o), l),
                                           _mm512_loadu_si512(x.lo + o + 64), h);
    return _mm512_add_epi32(_mm512_slli_epi32(ph, 8), pl);
  }
  // Two quads' partial sums (4 lanes a block) -> the eight blocks' sums in order.
  VNNI_TARGET static __m256i in_order(const __m512i& a, const __m512i& c) {
    // per 128-bit lane k: [a0+a2, c0+c2, a1+a3, c1+c3], then [block k, block 4+k, ...]
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi32(a, c), _mm512_unpackhi_epi32(a, c));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, s));
  }
  VNNI_TARGET __m256i dot(const QRow& x, int64_t b, int64_t) const {
    return in_order(quad(l0, h0, x, b * 32), quad(l1, h1, x, b * 32 + 128));
  }
};

// Eight Q6_K blocks on 512-bit registers: Eight4Vnni's quads with each nibble's top 2 bits added (16
// bytes of them broadcast to the four lanes, lane t shifted by 2t), and the sums of elements 0-15 and
// 16-31 of each block kept apart for their two scales (the same integers as Eight6Avx2's).
struct Eight6Vnni {
  __m512i l0, h0, l1, h1;  // 6-bit values: quad 0's elements 0-15 and 16-31, quad 1's
  VNNI_TARGET static __m512i top(const uint8_t* hb) {
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hb)));
    const __m512i shifted = _mm512_srlv_epi32(v, _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6));
    return _mm512_and_si512(_mm512_slli_epi32(shifted, 4), _mm512_set1_epi8(0x30));
  }
  VNNI_TARGET static Eight6Vnni load(const uint8_t* qs, const uint8_t* hb) {
    const Eight4Vnni n = Eight4Vnni::load(qs);
    return {_mm512_or_si512(n.l0, top(hb)), _mm512_or_si512(n.h0, top(hb + 16)), _mm512_or_si512(n.l1, top(hb + 32)),
            _mm512_or_si512(n.h1, top(hb + 48))};
  }
  // 256 * (q . hi) + q . lo over one half of a quad's blocks, its first activation byte at o
  VNNI_TARGET static __m512i half(const __m512i& q, const QRow& x, int64_t o) {
    const __m512i z = _mm512_setzero_si512();
    return _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, q, _mm512_loadu_si512(x.hi + o)), 8),
                            _mm512_dpbusd_epi32(z, _mm512_loadu_si512(x.lo + o), q));
  }
  VNNI_TARGET void dot(const QRow& x, int64_t b, int64_t, __m256i& lo, __m256i& hi) const {
    const int64_t o = b * 32;
    lo = Eight4Vnni::in_order(half(l0, x, o), half(l1, x, o + 128));
    hi = Eight4Vnni::in_order(half(h0, x, o + 64), half(h1, x, o + 192));
  }
};

LLAMALITE_DEFINE_DOT(VNNI_TARGET, block_dot_vnni, pair_dot_vnni, Eight4Vnni, Eight6Vnni, dot_vnni)

// One block to 32 floats.
AVX2_TARGET void dequant_block_avx2(int64_t type, const Packed& w, int64_t b, float* out) {
  float df, mf;
  if (type == Q4_K) {
    block_scale_min(type, w, b, df, mf);
  } else {
    df = _cvtsh_ss(w.d[b]);
    mf = type == Q4_1 ? _cvtsh_ss(w.m[b]) : -8.f * df;
  }
  const __m256 d = _mm256_set1_ps(df);
  if (type == Q8_0) {
    for (int j = 0; j < 32; j += 8) {
      const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.qs + b * 32 + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
    }
    return;
  }
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + b * 16));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  const __m256 m = _mm256_set1_ps(mf);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(v, d, m));  // q*d + m, or q*d - 8d (exactly (q-8)*d)
  }
}

// Q6_K block b's stored values (0-63) as bytes: v[0] elements 0-15, v[1] 16-31 (q6_value, 16 at once).
AVX2_TARGET inline void six_bit_values(const Packed& w, int64_t b, __m128i* v) {
  const __m128i mask = _mm_set1_epi8(0x0f), three = _mm_set1_epi8(3);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + 16 * b));
  const uint8_t* hb = w.hb + 64 * (b / 8) + 32 * (b % 8 / 4);
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(2 * (b % 4)));
  const __m128i tl = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hb)), shift), three);
  const __m128i th = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hb + 16)), shift),
                                   three);
  v[0] = _mm_or_si128(_mm_and_si128(q, mask), _mm_slli_epi16(tl, 4));
  v[1] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(q, 4), mask), _mm_slli_epi16(th, 4));
}

// One Q6_K block to 32 floats: (q - 32) * (d * scale), exact as the scalar path.
AVX2_TARGET void dequant_block6_avx2(const Packed& w, int64_t b, float* out) {
  __m128i v[2];
  six_bit_values(w, b, v);
  for (int half = 0; half < 2; ++half) {
    const __m256 sc = _mm256_set1_ps(_cvtsh_ss(w.d[b / 8]) *
                                     static_cast<float>(static_cast<int8_t>(w.sc[16 * (b / 8) + 8 * half + b % 8])));
    for (int j = 0; j < 2; ++j) {
      const __m256i e = _mm256_sub_epi32(_mm256_cvtepu8_epi32(j ? _mm_srli_si128(v[half], 8) : v[half]),
                                         _mm256_set1_epi32(32));
      _mm256_storeu_ps(out + 16 * half + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(e), sc));
    }
  }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

bool has_vnni() {
  static const bool ok = has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

enum Path : int64_t { BEST = 0, PORTABLE = 1, AVX2 = 2, VNNI = 3, VNNI_GEMM = 4 };

int64_t resolve_path(int64_t path) {
  if (path == BEST) return has_vnni() ? VNNI : has_avx2() ? AVX2 : PORTABLE;
  TORCH_CHECK(path == PORTABLE || (path == AVX2 && has_avx2()) || ((path == VNNI || path == VNNI_GEMM) && has_vnni()),
              "llamalite: kernel path ", path, " is not available on this CPU");
  return path;
}

void check_packed(const at::Tensor& w, int64_t type) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "llamalite: weights must be a contiguous (N, bytes) uint8 tensor");
  TORCH_CHECK(w.size(1) % unit_bytes(type) == 0, "llamalite: a row of ", w.size(1),
              " bytes is not a whole number of blocks of ", unit_bytes(type));
}

// check_packed, and rows of K elements (K a multiple of 32); what names the weight in the error.
void check_rows(const at::Tensor& w, int64_t type, int64_t K, const std::string& what) {
  check_packed(w, type);
  TORCH_CHECK(K % elements_per_row_unit(type) == 0 && w.size(1) == row_bytes(type, K / 32), what, " has ",
              w.size(1), " bytes a row, but K=", K, " needs ", row_bytes(type, K / 32), " (and K a multiple of ",
              elements_per_row_unit(type), ")");
}

// ----- ops ---------------------------------------------------------------------------------------

// Makes [p, p + n) private and writable in one call where the kernel can (Linux 5.14+): a copy-on-write
// mapping of a file otherwise takes two page faults a page, a read and a copy, as it is rewritten
// (7B: two million faults, 7 s of a 9 s load). Elsewhere a no-op; failure only costs that time.
void populate_for_writing(uint8_t* p, int64_t n) {
#ifdef __linux__
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + n + page - 1) / page * page;
  if (n > 0) madvise(reinterpret_cast<void*>(lo), hi - lo, kPopulateWrite);
#endif
}

// ns Q4_K super-blocks as the file has them -> packed_row's layout (see Packed) at o.
void repack_k4(const uint8_t* r, int64_t ns, uint8_t* o) {
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* sb = r + 144 * s;
    std::memcpy(o + 2 * s, sb, 2);                  // d
    std::memcpy(o + 2 * ns + 2 * s, sb + 2, 2);     // dmin
    std::memcpy(o + 4 * ns + 12 * s, sb + 4, 12);   // scales and mins
    uint8_t* qs = o + 16 * ns + 128 * s;
    for (int j = 0; j < 8; ++j) {  // block j: nibble j % 2 of the bytes of 64-element chunk j / 2
      const uint8_t* chunk = sb + 16 + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int i = 0; i < 16; ++i) {
        qs[16 * j + i] = static_cast<uint8_t>(((chunk[i] >> shift) & 0x0f) | (((chunk[i + 16] >> shift) & 0x0f) << 4));
      }
    }
  }
}

// ns Q6_K super-blocks as the file has them -> packed_row's layout (see Packed) at o. The file's
// layout (ggml's dequantize_row_q6_K): per 128 elements, 64 bytes of low nibbles ql, 32 of 2-bit
// fields qh, 8 scales; element l + 32 i (l < 32, i < 4) takes nibble i / 2 of ql[l + 32 (i % 2)] and
// bits 2i, 2i+1 of qh[l]; element e's scale is scales[e / 16].
void repack_k6(const uint8_t* r, int64_t ns, uint8_t* o) {
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* sb = r + 210 * s;
    uint8_t q[256];
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = sb + 64 * half;
      const uint8_t* qh = sb + 128 + 32 * half;
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 4; ++i) {
          const int nib = (ql[l + 32 * (i % 2)] >> (4 * (i / 2))) & 0x0f;
          q[128 * half + l + 32 * i] = static_cast<uint8_t>(nib | (((qh[l] >> (2 * i)) & 3) << 4));
        }
      }
    }
    std::memcpy(o + 2 * s, sb + 208, 2);  // d
    uint8_t* sc = o + 2 * ns + 16 * s;
    for (int j = 0; j < 8; ++j) {  // block j's elements 0-15 are scale 2j's, 16-31 scale 2j+1's
      sc[j] = sb[192 + 2 * j];
      sc[8 + j] = sb[192 + 2 * j + 1];
    }
    uint8_t* hb = o + 18 * ns + 64 * s;
    uint8_t* qs = o + 82 * ns + 128 * s;
    for (int j = 0; j < 8; ++j) {
      for (int i = 0; i < 16; ++i) qs[16 * j + i] = static_cast<uint8_t>((q[32 * j + i] & 0x0f) | (q[32 * j + i + 16] << 4));
    }
    for (int g = 0; g < 2; ++g) {
      for (int k = 0; k < 16; ++k) {
        uint8_t lo = 0, hi = 0;
        for (int t = 0; t < 4; ++t) {
          lo |= static_cast<uint8_t>((q[32 * (4 * g + t) + k] >> 4) << (2 * t));
          hi |= static_cast<uint8_t>((q[32 * (4 * g + t) + 16 + k] >> 4) << (2 * t));
        }
        hb[32 * g + k] = lo;
        hb[32 * g + 16 + k] = hi;
      }
    }
  }
}

// GGUF rows (array of blocks) -> repacked rows (structure of arrays), in place, a row at a time.
// In place, a copy-on-write mapping of the file turns into the weights without a second copy.
void repack_(at::Tensor& w, int64_t type) {
  check_packed(w, type);
  const int64_t N = w.size(0), rb = w.size(1), nb = row_blocks(type, rb), qb = quant_bytes(type);
  const int64_t sf = scale_fields(type), bb = unit_bytes(type);  // bb: a block's bytes (not K-quants)
  uint8_t* data = w.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    populate_for_writing(data + begin * rb, (end - begin) * rb);
    std::vector<uint8_t> row(rb);
    for (int64_t n = begin; n < end; ++n) {
      uint8_t* o = data + n * rb;
      std::memcpy(row.data(), o, rb);
      const uint8_t* r = row.data();
      if (type == Q4_K || type == Q6_K) {
        (type == Q4_K ? repack_k4 : repack_k6)(r, nb / 8, o);
        continue;
      }
      for (int64_t b = 0; b < nb; ++b) {
        std::memcpy(o + 2 * b, r + b * bb, 2);                                   // d
        if (sf == 2) std::memcpy(o + 2 * nb + 2 * b, r + b * bb + 2, 2);         // m
        std::memcpy(o + 2 * nb * sf + b * qb, r + b * bb + 2 * sf, qb);          // qs
      }
    }
  });
}

at::Tensor repack(const at::Tensor& w, int64_t type) {
  at::Tensor out = w.contiguous().clone();
  repack_(out, type);
  return out;
}

// ----- AVX-512 VNNI matrix product (prefill) -------------------------------------------------------
// With more activation rows than MAX_ROWS, each weight is worth unpacking once for all of them. Per
// tile of GEMM_NR weight rows and GEMM_KB blocks, the blocks are unpacked to int16 in vpdpwssd's
// layout: for each of a block's 16 pair slots j, the 32 rows' pairs (w[j], w[j+16]) side by side (a
// 4-bit byte holds exactly that pair: low nibble j, high nibble j + 16). One vpdpwssd then multiplies
// 16 rows' pairs by one broadcast activation pair. Activations are quantized as for the dot products
// (int16, one scale per row and block, pairs in the same (j, j+16) order), so each block's product is
// exact integer arithmetic, scaled once per block; every row goes through the same operations in the
// same order whatever the batch, so a row's result does not depend on the rows beside it.

constexpr int64_t GEMM_NR = 32;  // weight rows a tile: two registers of 16 lanes
constexpr int64_t GEMM_MR = 6;   // activation rows a pass over the tile: 12 int32 + 12 fp32 accumulators
constexpr int64_t GEMM_KB = 8;   // blocks a tile: 16 KB of int16 pairs, in L1 for every row

// One row of x -> nb blocks of 16 int32 (pairs (q[j], q[j+16]) of int16), scales and fp32 sums.
VNNI_TARGET void quantize_pairs(const float* x, int64_t nb, int32_t* q, float* scale, float* sum) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * 32), hi = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float sc = amax / 32767.f;
    const __m512 inv = _mm512_set1_ps(sc > 0.f ? 1.f / sc : 0.f);
    const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm512_storeu_si512(q + b * 16, _mm512_or_si512(_mm512_and_si512(ql, _mm512_set1_epi32(0xffff)),
                                                    _mm512_slli_epi32(qh, 16)));
    scale[b] = sc;
    sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

// 32 rows of 16 bytes, r[i] = [row i | row i + 16], transposed in place: r[j] = [byte j of rows 0-15 |
// byte j of rows 16-31]. Four rounds of unpacks, each within 128-bit lanes.
VNNI_TARGET inline void transpose_bytes(__m256i* r) {
  __m256i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // 16-bit units j: rows 2i, 2i+1 of byte j (t[2i]) or 8 + j (t[2i+1])
    t[2 * i] = _mm256_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + q]: 32-bit units = rows 4g..4g+3 of bytes 4q..4q+3
    u[4 * g] = _mm256_unpacklo_epi16(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm256_unpackhi_epi16(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm256_unpacklo_epi16(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm256_unpackhi_epi16(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int h = 0; h < 2; ++h) {  // t[8h + k]: 64-bit units = rows 8h..8h+7 of bytes 2k, 2k + 1
    for (int q = 0; q < 4; ++q) {
      t[8 * h + 2 * q] = _mm256_unpacklo_epi32(u[8 * h + q], u[8 * h + 4 + q]);
      t[8 * h + 2 * q + 1] = _mm256_unpackhi_epi32(u[8 * h + q], u[8 * h + 4 + q]);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[2 * k] = _mm256_unpacklo_epi64(t[k], t[8 + k]);
    r[2 * k + 1] = _mm256_unpackhi_epi64(t[k], t[8 + k]);
  }
}

// 16 bytes at offset `at` of rows r and r + 16 (zeros past nr) in one register.
VNNI_TARGET inline __m256i two_rows(const Packed* rows, int64_t nr, int64_t r, int64_t at) {
  const __m128i z = _mm_setzero_si128();
  const __m128i a = r < nr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r].qs + at)) : z;
  const __m128i b = r + 16 < nr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + 16].qs + at)) : z;
  return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
}

// Blocks b0..b0+kb-1 of rows[0..nr) -> tile: block i's slot j at tile + (16 i + j) * 32, one int32 pair a
// row (rows past nr zero); d (and Q4_1's m) as fp32 at dsc / msc + 32 i.
template <int64_t TYPE>
VNNI_TARGET void unpack_tile(const Packed* rows, int64_t nr, int64_t b0, int64_t kb, int32_t* tile, float* dsc,
                             float* msc) {
  constexpr int64_t QB = TYPE == Q8_0 ? 32 : 16;
  for (int64_t i = 0; i < kb; ++i) {
    const int64_t b = b0 + i;
    for (int64_t r = 0; r < GEMM_NR; ++r) {
      if (TYPE == Q4_K) {
        float d = 0.f, m = 0.f;
        if (r < nr) block_scale_min(TYPE, rows[r], b, d, m);
        dsc[32 * i + r] = d;
        msc[32 * i + r] = m;
        continue;
      }
      dsc[32 * i + r] = r < nr ? _cvtsh_ss(rows[r].d[b]) : 0.f;
      if (TYPE == Q4_1) msc[32 * i + r] = r < nr ? _cvtsh_ss(rows[r].m[b]) : 0.f;
    }
    int32_t* out = tile + 16 * i * 32;
    __m256i c[16], e[16];
    for (int r = 0; r < 16; ++r) c[r] = two_rows(rows, nr, r, b * QB);
    transpose_bytes(c);
    if (TYPE == Q8_0) {  // bytes j and j + 16 of the int8 row make pair j
      for (int r = 0; r < 16; ++r) e[r] = two_rows(rows, nr, r, b * QB + 16);
      transpose_bytes(e);
    }
    for (int j = 0; j < 16; ++j) {
      for (int half = 0; half < 2; ++half) {
        const __m128i cj = half ? _mm256_extracti128_si256(c[j], 1) : _mm256_castsi256_si128(c[j]);
        __m512i p;
        if (TYPE == Q8_0) {
          const __m128i ej = half ? _mm256_extracti128_si256(e[j], 1) : _mm256_castsi256_si128(e[j]);
          p = _mm512_or_si512(_mm512_and_si512(_mm512_cvtepi8_epi32(cj), _mm512_set1_epi32(0xffff)),
                              _mm512_slli_epi32(_mm512_cvtepi8_epi32(ej), 16));
        } else {  // (low nibble, high nibble) as two int16
          const __m512i z = _mm512_cvtepu8_epi32(cj);
          p = _mm512_and_si512(_mm512_or_si512(z, _mm512_slli_epi32(z, 12)), _mm512_set1_epi32(0x000f000f));
          if (TYPE == Q4_0) p = _mm512_sub_epi16(p, _mm512_set1_epi16(8));
        }
        _mm512_storeu_si512(out + 32 * j + 16 * half, p);
      }
    }
  }
}

// unpack_tile for Q6_K: each value times its half-block's int8 scale, (q - 32) * scale, in int16 (at
// most 32 * 128 = 4096; gemm_rows sums a block's 16 pair slots in two runs of 8, so that no int32 sum
// can overflow: 8 * 2 * 4096 * 32767 < 2^31); dsc = d.
VNNI_TARGET void unpack_tile6(const Packed* rows, int64_t nr, int64_t b0, int64_t kb, int32_t* tile, float* dsc) {
  for (int64_t i = 0; i < kb; ++i) {
    const int64_t b = b0 + i, s = b / 8, j = b % 8;
    int32_t* out = tile + 16 * i * 32;
    for (int64_t r = 0; r < GEMM_NR; ++r) {
      if (r >= nr) {
        dsc[32 * i + r] = 0.f;
        for (int k = 0; k < 16; ++k) out[32 * k + r] = 0;
        continue;
      }
      const Packed& w = rows[r];
      dsc[32 * i + r] = _cvtsh_ss(w.d[s]);
      __m128i v[2];
      six_bit_values(w, b, v);
      const __m512i c = _mm512_set1_epi32(32);
      const __m512i lo = _mm512_mullo_epi32(_mm512_sub_epi32(_mm512_cvtepu8_epi32(v[0]), c),
                                            _mm512_set1_epi32(static_cast<int8_t>(w.sc[16 * s + j])));
      const __m512i hi = _mm512_mullo_epi32(_mm512_sub_epi32(_mm512_cvtepu8_epi32(v[1]), c),
                                            _mm512_set1_epi32(static_cast<int8_t>(w.sc[16 * s + 8 + j])));
      alignas(64) int32_t pairs[16];
      _mm512_store_si512(pairs, _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xffff)),
                                                _mm512_slli_epi32(hi, 16)));
      for (int k = 0; k < 16; ++k) out[32 * k + r] = pairs[k];
    }
  }
}

// y[m, 0..nr) for MR activation rows against a tile of kb blocks: x, s and sum point at the rows'
// first block of the tile, xstride / sstride apart; acc_in: start from y (a later tile of K, or add).
template <int64_t TYPE, int MR>
VNNI_TARGET void gemm_rows(const int32_t* tile, const float* dsc, const float* msc, int64_t kb, const int32_t* x,
                           int64_t xstride, const float* s, const float* sum, int64_t sstride, float* y, int64_t ldy,
                           int64_t nr, bool acc_in) {
  const __mmask16 k0 = nr >= 16 ? 0xffff : (1u << nr) - 1;
  const __mmask16 k1 = nr >= 32 ? 0xffff : nr > 16 ? (1u << (nr - 16)) - 1 : 0;
  __m512 f[MR][2];
  for (int m = 0; m < MR; ++m) {
    f[m][0] = acc_in ? _mm512_maskz_loadu_ps(k0, y + m * ldy) : _mm512_setzero_ps();
    f[m][1] = acc_in ? _mm512_maskz_loadu_ps(k1, y + m * ldy + 16) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < kb; ++i) {
    __m512i a[MR][2];
    for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = _mm512_setzero_si512();
    const int32_t* t = tile + 16 * i * 32;
    const __m512 d0 = _mm512_loadu_ps(dsc + 32 * i), d1 = _mm512_loadu_ps(dsc + 32 * i + 16);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (TYPE == Q6_K && j == 8) {  // scaled 6-bit values: a run of 8 pair slots is all int32 can hold
        for (int m = 0; m < MR; ++m) {
          const __m512 sm = _mm512_set1_ps(s[m * sstride + i]);
          f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(d0, sm), f[m][0]);
          f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(d1, sm), f[m][1]);
          a[m][0] = a[m][1] = _mm512_setzero_si512();
        }
      }
      const __m512i w0 = _mm512_loadu_si512(t + 32 * j), w1 = _mm512_loadu_si512(t + 32 * j + 16);
      for (int m = 0; m < MR; ++m) {
        const __m512i xb = _mm512_set1_epi32(x[m * xstride + 16 * i + j]);
        a[m][0] = _mm512_dpwssd_epi32(a[m][0], w0, xb);
        a[m][1] = _mm512_dpwssd_epi32(a[m][1], w1, xb);
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 sm = _mm512_set1_ps(s[m * sstride + i]);
      f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(d0, sm), f[m][0]);
      f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(d1, sm), f[m][1]);
      if (TYPE == Q4_1 || TYPE == Q4_K) {
        const __m512 xs = _mm512_set1_ps(sum[m * sstride + i]);
        f[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(msc + 32 * i), xs, f[m][0]);
        f[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(msc + 32 * i + 16), xs, f[m][1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(y + m * ldy, k0, f[m][0]);
    _mm512_mask_storeu_ps(y + m * ldy + 16, k1, f[m][1]);
  }
}

// qproduct for M > MAX_ROWS on the VNNI path (see there for the arguments).
template <int64_t TYPE>
VNNI_TARGET void qgemm(const float* x, int64_t M, int64_t K, const std::vector<const uint8_t*>& bases,
                       const std::vector<int64_t>& starts, float* y, bool add) {
  const int64_t nb = K / 32, N = starts.back(), rb = row_bytes(TYPE, nb);
  std::vector<int32_t> xq(M * nb * 16);
  std::vector<float> xs(M * nb), xsum(M * nb);
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_pairs(x + m * K, nb, xq.data() + m * nb * 16, xs.data() + m * nb, xsum.data() + m * nb);
    }
  });
  std::vector<std::pair<size_t, int64_t>> tiles;  // (weight, first row)
  for (size_t j = 0; j + 1 < starts.size(); ++j) {
    for (int64_t n = 0; n < starts[j + 1] - starts[j]; n += GEMM_NR) tiles.push_back({j, n});
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<int32_t> tile(GEMM_KB * 16 * GEMM_NR);
    thread_local std::vector<float> dsc(GEMM_KB * GEMM_NR), msc(GEMM_KB * GEMM_NR);
    Packed rows[GEMM_NR];
    for (int64_t t = begin; t < end; ++t) {
      const auto [j, n0] = tiles[t];
      const int64_t nr = std::min(GEMM_NR, starts[j + 1] - starts[j] - n0);
      for (int64_t r = 0; r < nr; ++r) rows[r] = packed_row(TYPE, bases[j] + (n0 + r) * rb, nb);
      float* yt = y + starts[j] + n0;
      for (int64_t b0 = 0; b0 < nb; b0 += GEMM_KB) {
        const int64_t kb = std::min(GEMM_KB, nb - b0);
        if (TYPE == Q6_K) {
          unpack_tile6(rows, nr, b0, kb, tile.data(), dsc.data());
        } else {
          unpack_tile<TYPE>(rows, nr, b0, kb, tile.data(), dsc.data(), msc.data());
        }
        const bool acc_in = add || b0 > 0;
        int64_t m = 0;
        for (; m + GEMM_MR <= M; m += GEMM_MR) {
          gemm_rows<TYPE, GEMM_MR>(tile.data(), dsc.data(), msc.data(), kb, xq.data() + (m * nb + b0) * 16, nb * 16,
                                   xs.data() + m * nb + b0, xsum.data() + m * nb + b0, nb, yt + m * N, N, nr, acc_in);
        }
        auto rest = [&](auto mr) {
          gemm_rows<TYPE, decltype(mr)::value>(tile.data(), dsc.data(), msc.data(), kb, xq.data() + (m * nb + b0) * 16,
                                               nb * 16, xs.data() + m * nb + b0, xsum.data() + m * nb + b0, nb,
                                               yt + m * N, N, nr, acc_in);
        };
        switch (M - m) {
          case 1: rest(std::integral_constant<int, 1>()); break;
          case 2: rest(std::integral_constant<int, 2>()); break;
          case 3: rest(std::integral_constant<int, 3>()); break;
          case 4: rest(std::integral_constant<int, 4>()); break;
          case 5: rest(std::integral_constant<int, 5>()); break;
        }
      }
    }
  });
}

// y = x @ [W_0; W_1; ...].T for M activation rows x (M, K) fp32 and repacked weights given by their
// first bytes (bases) and first output columns (starts, one more than bases: the last is N); y is
// (M, N) with rows N apart, written or (add) added to. Layers that read the same input (q/k/v,
// gate/up) share one activation quantization and one parallel region, and their blocks stay where
// they are.
// M rows of x (M, K) quantized for the dot products (int16 values by block, in `scratch`), as QRows.
std::vector<QRow> quantize_rows(const float* x, int64_t M, int64_t K, int64_t path, std::vector<uint8_t>& scratch) {
  const int64_t nb = K / 32, per_row = K * 2 + K * 2 + nb * 16;
  scratch.resize(M * per_row + 64);
  std::vector<QRow> rows(M);
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* base = scratch.data() + m * per_row;
    auto* q = reinterpret_cast<int16_t*>(base);
    auto* hi = reinterpret_cast<int8_t*>(base + 2 * K);
    auto* lo = base + 3 * K;
    auto* scale = reinterpret_cast<float*>(base + 4 * K);
    auto* sum = scale + nb;
    auto* qsum = reinterpret_cast<int32_t*>(sum + nb);
    auto* qsum16 = qsum + nb;
    (path == PORTABLE ? quantize_row : quantize_row_avx2)(x + m * K, K, q, hi, lo, scale, sum, qsum, qsum16);
    rows[m] = {q, hi, lo, scale, sum, qsum, qsum16};
  }
  return rows;
}

// One weight row against mc (at most MAX_ROWS) activation rows: y[m * ystride] (+)= row . x_m.
inline void dots(int64_t type, int64_t path, const Packed& row, const QRow* xs, int64_t mc, int64_t nb, float* y,
                 int64_t ystride, bool add) {
  if (path == VNNI) {
    dot_vnni_any(type, row, xs, mc, nb, y, ystride, add);
  } else if (path == AVX2) {
    dot_avx2_any(type, row, xs, mc, nb, y, ystride, add);
  } else {
    for (int64_t m = 0; m < mc; ++m) {
      const float r = dot_ref(type, row, xs[m], nb);
      y[m * ystride] = add ? y[m * ystride] + r : r;
    }
  }
}

// Products of several weights, each with its own few activation rows, in one parallel pass over all their
// weight rows (one fork and join for all: a mixture of experts' decode step has 8-16 small products a
// layer). Job j: rows [0, n) of repacked `base` against its mc <= MAX_ROWS QRows xs, into y[m * ystride + i].
struct DotJob {
  const uint8_t* base;
  int64_t n;
  const QRow* xs;
  int64_t mc;
  float* y;
  int64_t ystride;
};

void grouped_dots(int64_t type, int64_t K, int64_t path, const std::vector<DotJob>& jobs) {
  const int64_t nb = K / 32, rb = row_bytes(type, nb);
  std::vector<int64_t> starts{0};
  for (const DotJob& j : jobs) starts.push_back(starts.back() + j.n);
  at::parallel_for(0, starts.back(), 32, [&](int64_t begin, int64_t end) {
    size_t j = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t n = begin; n < end; ++n) {
      while (n >= starts[j + 1]) ++j;
      const DotJob& job = jobs[j];
      const int64_t i = n - starts[j];
      dots(type, path, packed_row(type, job.base + i * rb, nb), job.xs, job.mc, nb, job.y + i, job.ystride, false);
    }
  });
}

void qproduct(const float* x, int64_t M, int64_t K, const std::vector<const uint8_t*>& bases,
              const std::vector<int64_t>& starts, int64_t type, int64_t path, float* y, bool add) {
  const int64_t N = starts.back(), nb = K / 32, rb = row_bytes(type, nb);
  if (path == VNNI_GEMM) {
    switch (type) {
      case Q8_0: return qgemm<Q8_0>(x, M, K, bases, starts, y, add);
      case Q4_1: return qgemm<Q4_1>(x, M, K, bases, starts, y, add);
      case Q4_K: return qgemm<Q4_K>(x, M, K, bases, starts, y, add);
      case Q6_K: return qgemm<Q6_K>(x, M, K, bases, starts, y, add);
      default: return qgemm<Q4_0>(x, M, K, bases, starts, y, add);
    }
  }
  thread_local std::vector<uint8_t> scratch;  // the quantized activations, reused across calls by this thread
  const std::vector<QRow> rows = quantize_rows(x, M, K, path, scratch);
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    size_t j = 0;
    for (int64_t n = begin; n < end; ++n) {
      while (n >= starts[j + 1]) ++j;
      const Packed row = packed_row(type, bases[j] + (n - starts[j]) * rb, nb);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        dots(type, path, row, rows.data() + m0, std::min(MAX_ROWS, M - m0), nb, y + m0 * N + n, N, add);
      }
    }
  });
}

// x: (M, K) fp32; ws: weights of (N_i, K/32 * block_bytes) repacked uint8 -> (M, sum N_i) fp32, the
// products with each weight side by side (qproduct).
at::Tensor qmatmul_list(const at::Tensor& x_in, at::TensorList ws, int64_t type, int64_t path) {
  TORCH_CHECK(x_in.dim() == 2, "qmatmul: x must be (M, K)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(!ws.empty(), "qmatmul: no weights");
  std::vector<const uint8_t*> bases;
  std::vector<int64_t> starts{0};
  for (const at::Tensor& w : ws) {
    check_rows(w, type, K, "qmatmul: w");
    starts.push_back(starts.back() + w.size(0));
    bases.push_back(w.data_ptr<uint8_t>());
  }
  auto out = at::empty({M, starts.back()}, x.options());
  int64_t p = resolve_path(path);
  if (path == BEST && p == VNNI && M > MAX_ROWS) p = VNNI_GEMM;  // matrix-matrix: weights unpacked once for all rows
  qproduct(x.data_ptr<float>(), M, K, bases, starts, type, p, out.data_ptr<float>(), false);
  return out;
}

at::Tensor qmatmul_path(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t path) {
  return qmatmul_list(x, {w}, type, path);
}

at::Tensor qmatmul_multi(const at::Tensor& x, at::TensorList ws, int64_t type) { return qmatmul_list(x, ws, type, BEST); }

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& w, int64_t type) { return qmatmul_path(x, w, type, BEST); }

// MXFP4 blocks (uint8 e, then 16 bytes of 4-bit E2M1 codes: elements 0-15 low nibbles, 16-31 high) -> Q8_0
// blocks in GGUF order of exactly the same values: d = 2^(e - 128) as fp16 and the codes' integers (-12..12) as
// the int8 values; a scale under fp16's least subnormal (e - 128 < -24) takes d = 2^-24, its values rounded to it.
// The caller checks that no scale is past fp16's range (e - 128 > 15).
at::Tensor mxfp4_as_q8_0(const at::Tensor& raw_in) {
  const at::Tensor raw = raw_in.contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.numel() % 17 == 0, "mxfp4_as_q8_0: whole MXFP4 blocks of 17 bytes");
  const int64_t n = raw.numel() / 17;
  auto out = at::empty({n, 34}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  static const int8_t kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* s = src + b * 17;
      uint8_t* o = dst + b * 34;
      const int exp = static_cast<int>(s[0]) - 128;
      TORCH_CHECK(exp <= 15, "mxfp4_as_q8_0: a scale of 2^", exp, " is past fp16's range");
      const uint16_t d = exp >= -14 ? static_cast<uint16_t>((exp + 15) << 10)  // a normal fp16: 2^exp
                                    : static_cast<uint16_t>(1u << (std::max(exp, -24) + 24));  // a subnormal
      std::memcpy(o, &d, 2);
      auto* q = reinterpret_cast<int8_t*>(o + 2);
      for (int i = 0; i < 16; ++i) {
        int lo = kv[s[1 + i] & 0x0F], hi = kv[s[1 + i] >> 4];
        if (exp < -24) {  // rounded to the least subnormal: values of 2^exp * kv, in units of 2^-24
          lo = static_cast<int>(std::nearbyint(std::ldexp(static_cast<float>(lo), exp + 24)));
          hi = static_cast<int>(std::nearbyint(std::ldexp(static_cast<float>(hi), exp + 24)));
        }
        q[i] = static_cast<int8_t>(lo);
        q[16 + i] = static_cast<int8_t>(hi);
      }
    }
  });
  return out;
}

// One repacked row of nb blocks -> nb * 32 floats.
void dequant_row(int64_t type, const Packed& row, int64_t nb, float* out) {
  const bool simd = has_avx2();
  const int64_t qb = quant_bytes(type);
  for (int64_t b = 0; type == Q6_K && b < nb; ++b) {  // (q - 32) * (d * scale), exact
    if (simd) {
      dequant_block6_avx2(row, b, out + b * 32);
      continue;
    }
    for (int i = 0; i < 32; ++i) out[b * 32 + i] = static_cast<float>(q6_value(row, b, i) - 32) * q6_scale(row, b, i / 16);
  }
  for (int64_t b = 0; type != Q6_K && b < nb; ++b) {
    float* o = out + b * 32;
    if (simd) {
      dequant_block_avx2(type, row, b, o);
      continue;
    }
    float d, mn;
    block_scale_min(type, row, b, d, mn);
    const uint8_t* qs = row.qs + b * qb;
    if (type == Q8_0) {
      for (int j = 0; j < 32; ++j) o[j] = reinterpret_cast<const int8_t*>(qs)[j] * d;
    } else if (has_min(type)) {
      for (int j = 0; j < 16; ++j) {
        o[j] = (qs[j] & 0x0f) * d + mn;
        o[j + 16] = (qs[j] >> 4) * d + mn;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        o[j] = ((qs[j] & 0x0f) - 8) * d;
        o[j + 16] = ((qs[j] >> 4) - 8) * d;
      }
    }
  }
}

// Repacked (N, bytes) -> (N, K) fp32, for matrix-matrix work through fp32 GEMM and embedding rows.
at::Tensor dequantize(const at::Tensor& w_in, int64_t type) {
  const at::Tensor w = w_in.contiguous();
  check_packed(w, type);
  const int64_t N = w.size(0), nb = row_blocks(type, w.size(1)), K = nb * 32, rb = w.size(1);
  auto out = at::empty({N, K}, at::kFloat);
  float* y = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) dequant_row(type, packed_row(type, wp + n * rb, nb), nb, y + n * K);
  });
  return out;
}

// One row of K = 32 * nb fp32 values -> Q8_0 blocks in the kernels' packed layout ([d of each block as fp16]
// [32 int8 of each block]), ggml's rounding: d = amax / 127, q = round(x / d).
void quantize_row_q8_0(const float* x, int64_t nb, uint8_t* row) {
  auto* d = reinterpret_cast<uint16_t*>(row);
  auto* qs = reinterpret_cast<int8_t*>(row + 2 * nb);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    const at::Half h(scale);
    std::memcpy(d + b, &h, 2);
    for (int i = 0; i < 32; ++i) qs[b * 32 + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
  }
}

// fp32 (N, K) -> Q8_0 blocks in the kernels' packed layout (quantize_row_q8_0). For weight types without a
// kernel of their own (the K-quants): re-quantized to Q8_0 at load, they run on the Q8_0 kernel instead
// of as fp32.
at::Tensor quantize_q8_0(const at::Tensor& w_in) {
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 32 == 0, "quantize_q8_0: w must be (N, K) with K a multiple of 32");
  const int64_t N = w.size(0), K = w.size(1), nb = K / 32;
  auto out = at::empty({N, nb * 34}, at::kByte);
  const float* src = w.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) quantize_row_q8_0(src + n * K, nb, dst + n * nb * 34);
  });
  return out;
}

// ----- other decode-step ops ------------------------------------------------------------------------

// RMSNorm of fp32 rows: x * rsqrt(mean(x^2) + eps) * w (the model's RMSNorm, llamalite/model.py, is
// the reference).
void rms_rows(const float* x, const float* w, float* out, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) out[r * D + i] = xr[i] * inv * w[i];
  }
}

// rms_rows as an op: one call where PyTorch's eager path takes five.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(w.numel() == D, "rms_norm: weight has ", w.numel(), " elements for rows of ", D);
  auto out = at::empty_like(x);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    rms_rows(x.data_ptr<float>() + begin * D, w.data_ptr<float>(), out.data_ptr<float>() + begin * D, end - begin, D,
             static_cast<float>(eps));
  });
  return out;
}

// e^x for x <= 0 (softmax after the max is subtracted), 8 at once: Cephes' expf, 2^n * p(r) with
// n = round(x / ln 2) and a degree-6 polynomial on |r| <= ln2 / 2 (about 2 ulp). x is clamped at -87
// so 2^n stays a normal float: e^-87 instead of a smaller number next to the max's e^0 = 1.
AVX2_TARGET inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// KV cache types: a cache row (one position of one key/value head) holds head_dim values as fp32, fp16,
// bf16, or Q8_0 blocks in the kernels' packed layout ([d of each block as fp16][32 int8 of each block]:
// 34 bytes per 32 values, ggml's rounding). Attention reads each type as it is, converting 8 values at a
// time inside its loops: no fp32 copy of the cache.
enum KvType : int64_t { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8_0 = 3 };

int64_t kv_row_bytes(int64_t type, int64_t D) {
  return type == KV_F32 ? 4 * D : type == KV_Q8_0 ? D / 32 * 34 : 2 * D;
}

int64_t kv_type_of(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kFloat: return KV_F32;
    case at::kHalf: return KV_F16;
    case at::kBFloat16: return KV_BF16;
    case at::kByte: return KV_Q8_0;
    default: TORCH_CHECK(false, "llamalite: a KV cache of ", cache.scalar_type(), "; use f32, f16, bf16 or q8_0");
  }
  return KV_F32;
}

inline float bf16_to_fp32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One cache row written from D fp32 values (round to nearest even; Q8_0 by quantize_row_q8_0).
void kv_write(int64_t type, const float* x, int64_t D, uint8_t* row) {
  if (type == KV_F32) {
    std::memcpy(row, x, D * sizeof(float));
  } else if (type == KV_F16) {
    auto* h = reinterpret_cast<at::Half*>(row);
    for (int64_t i = 0; i < D; ++i) h[i] = at::Half(x[i]);
  } else if (type == KV_BF16) {
    auto* h = reinterpret_cast<at::BFloat16*>(row);
    for (int64_t i = 0; i < D; ++i) h[i] = at::BFloat16(x[i]);
  } else {
    quantize_row_q8_0(x, D / 32, row);
  }
}

// One cache row back to D fp32 values (the portable path and tests).
void kv_read(int64_t type, const uint8_t* row, int64_t D, float* out) {
  if (type == KV_F32) {
    std::memcpy(out, row, D * sizeof(float));
  } else if (type == KV_F16) {
    const auto* h = reinterpret_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < D; ++i) out[i] = fp16_to_fp32(h[i]);
  } else if (type == KV_BF16) {
    const auto* h = reinterpret_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < D; ++i) out[i] = bf16_to_fp32(h[i]);
  } else {
    dequant_row(Q8_0, packed_row(Q8_0, row, D / 32), D / 32, out);
  }
}

// Eight values j*8 .. j*8+7 of a cache row, as fp32, for each type.
struct RowF32 {
  AVX2_TARGET static inline __m256 load(const uint8_t* row, int64_t, int64_t j) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * j);
  }
};
struct RowF16 {
  AVX2_TARGET static inline __m256 load(const uint8_t* row, int64_t, int64_t j) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
  }
};
struct RowBf16 {
  AVX2_TARGET static inline __m256 load(const uint8_t* row, int64_t, int64_t j) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};
struct RowQ8 {  // eight int8 values as fp32, unscaled: dot8 and attend_avx2 apply each block's d (scale)
  static constexpr bool blocked = true;
  AVX2_TARGET static inline __m256 load(const uint8_t* row, int64_t nb, int64_t j) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 2 * nb + 8 * j));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  }
  AVX2_TARGET static inline float scale(const uint8_t* row, int64_t b) {
    return _cvtsh_ss(reinterpret_cast<const uint16_t*>(row)[b]);
  }
};

template <class Row, class = void>
struct Blocked : std::false_type {};
template <class Row>
struct Blocked<Row, std::void_t<decltype(Row::blocked)>> : std::true_type {};

// 8 partial sums of q . k (nv registers of 8 each), k a cache row.
template <class Row>
AVX2_TARGET inline __m256 dot8(const float* q, int64_t nv, const uint8_t* k, int64_t nb) {
  if constexpr (Blocked<Row>::value) {  // per block of 32: the integer values' dot, then times the block's d
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const float* qb = q + 32 * b;
      __m256 part = _mm256_mul_ps(_mm256_loadu_ps(qb), Row::load(k, nb, 4 * b));
      part = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 8), Row::load(k, nb, 4 * b + 1), part);
      part = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 16), Row::load(k, nb, 4 * b + 2), part);
      part = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 24), Row::load(k, nb, 4 * b + 3), part);
      acc = _mm256_fmadd_ps(part, _mm256_set1_ps(Row::scale(k, b)), acc);
    }
    return acc;
  } else {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), Row::load(k, nb, 0));
    for (int64_t j = 1; j < nv; ++j) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j), Row::load(k, nb, j), acc);
    return acc;
  }
}

// One query head against positions 0..end-1 of its cache row (rows rb bytes apart), head_dim D a
// multiple of 8: scores 8 positions at a time (their 8 dot products reduced together), softmax with
// exp_avx2, then the weighted sum of values in registers, normalised once at the end. p: scratch of
// at least end + 8.
template <class Row>
AVX2_TARGET void attend_avx2(const float* qh, const uint8_t* kb, const uint8_t* vb, int64_t rb, int64_t end,
                             int64_t D, float scale, float* p, float* oh, const float* sink) {
  const int64_t nv = D / 8, nb = D / 32;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= end; t += 8) {
    const uint8_t* k0 = kb + t * rb;
    const __m256 h01 = _mm256_hadd_ps(dot8<Row>(qh, nv, k0, nb), dot8<Row>(qh, nv, k0 + rb, nb));
    const __m256 h23 = _mm256_hadd_ps(dot8<Row>(qh, nv, k0 + 2 * rb, nb), dot8<Row>(qh, nv, k0 + 3 * rb, nb));
    const __m256 h45 = _mm256_hadd_ps(dot8<Row>(qh, nv, k0 + 4 * rb, nb), dot8<Row>(qh, nv, k0 + 5 * rb, nb));
    const __m256 h67 = _mm256_hadd_ps(dot8<Row>(qh, nv, k0 + 6 * rb, nb), dot8<Row>(qh, nv, k0 + 7 * rb, nb));
    const __m256 u0 = _mm256_hadd_ps(h01, h23), u1 = _mm256_hadd_ps(h45, h67);
    const __m256 sc = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                  _mm256_permute2f128_ps(u0, u1, 0x31)), _mm256_set1_ps(scale));
    _mm256_storeu_ps(p + t, sc);
    vmax = _mm256_max_ps(vmax, sc);
  }
  float mx = -INFINITY;
  for (; t < end; ++t) {
    p[t] = hsum(dot8<Row>(qh, nv, kb + t * rb, nb)) * scale;
    mx = std::max(mx, p[t]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float l : lanes) mx = std::max(mx, l);
  if (sink != nullptr) mx = std::max(mx, *sink);  // a sink's logit joins the softmax, to no value
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (t = 0; t + 8 <= end; t += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
    _mm256_storeu_ps(p + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < end; ++t) { p[t] = std::exp(p[t] - mx); sum += p[t]; }
  if (sink != nullptr) sum += std::exp(*sink - mx);
  __m256 acc[16];  // D <= 128 in registers; wider heads go in passes of 128 values
  for (int64_t j0 = 0; j0 < nv; j0 += 16) {
    const int64_t nr = std::min<int64_t>(nv - j0, 16);
    for (int64_t j = 0; j < nr; ++j) acc[j] = _mm256_setzero_ps();
    for (t = 0; t < end; ++t) {
      const uint8_t* vt = vb + t * rb;
      if constexpr (Blocked<Row>::value) {  // the weight times each block's d, once a block (4 registers)
        for (int64_t j = 0; j < nr; j += 4) {
          const __m256 w = _mm256_set1_ps(p[t] * Row::scale(vt, (j0 + j) / 4));
          for (int64_t i = 0; i < 4; ++i) acc[j + i] = _mm256_fmadd_ps(w, Row::load(vt, nb, j0 + j + i), acc[j + i]);
        }
      } else {
        const __m256 w = _mm256_set1_ps(p[t]);
        for (int64_t j = 0; j < nr; ++j) acc[j] = _mm256_fmadd_ps(w, Row::load(vt, nb, j0 + j), acc[j]);
      }
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int64_t j = 0; j < nr; ++j) _mm256_storeu_ps(oh + 8 * (j0 + j), _mm256_mul_ps(acc[j], inv));
  }
}

// Where a batch of single queries sits in the KV caches (R, KV, S, D) of a layer: row b of the batch
// at position pos[b] of cache row rows[b].
struct CacheSlots {
  const int64_t* pos;
  const int64_t* rows;
  int64_t B, R, S;
};

void check_slots(const CacheSlots& c) {
  for (int64_t b = 0; b < c.B; ++b) {
    TORCH_CHECK(c.pos[b] >= 0 && c.pos[b] < c.S, "llamalite: position ", c.pos[b], " is outside the cache of ", c.S);
    TORCH_CHECK(c.rows[b] >= 0 && c.rows[b] < c.R, "llamalite: cache row ", c.rows[b], " is outside the ", c.R,
                " rows");
  }
}

// One decode step of attention for a batch of single queries: RoPE on q and k, the new k and v
// written into the caches (in the caches' type), then grouped-query attention over the cache. Row b
// attends to positions 0..pos[b] of its cache row: requests of different lengths decode together.
// RoPE rotates interleaved pairs as model.apply_rope; softmax in fp32 (model.Attention is the reference).
//   q: B rows of H*D, qstride apart; k, v: B rows of KV*D, kvstride apart; cs: (B or 1 if !cs_rows,
//   D/2, 2) cos/sin; caches (R, KV, S, row) of kv_type; qr: scratch of B*H*D (and D more); out: (B, H*D).
// A layer's variations on attention (Llama 4's and gpt-oss's); the defaults: RoPE over the whole cache.
struct AttnOpts {
  bool rope = true;          // false: q and k go unrotated (Llama 4's global layers)
  float l2_eps = -1.f;       // >= 0: q and k RMS-normed, without a weight, after RoPE (Llama 4)
  int64_t temp_floor = 0;    // > 0: q times log1p(floor((pos + 1) / temp_floor)) * temp_scale + 1 (Llama 4)
  float temp_scale = 0.f;
  int64_t chunk = 0;         // > 0: a query sees the positions of its chunk up to its own (Llama 4)
  int64_t window = 0;        // > 0: a query sees the last `window` positions (gpt-oss)
  const float* sinks = nullptr;  // per head, a logit that joins the softmax, to no value (gpt-oss)
};

inline void rms_inplace(float* x, int64_t D, float eps) {  // as model.transformer.l2_norm, in fp32
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) x[i] *= r;
}

void attention_step(const float* q, int64_t qstride, const float* k, const float* v, int64_t kvstride,
                    const float* cs, bool cs_rows, uint8_t* kc, uint8_t* vc, int64_t kv_type, const CacheSlots& c,
                    int64_t H, int64_t KV, int64_t D, float* qr, float* out, int64_t path = BEST,
                    const AttnOpts& o = AttnOpts()) {
  auto rope = [&](const float* rot, const float* src, float* dst) {
    if (!o.rope) {
      std::memcpy(dst, src, D * sizeof(float));
    } else {
      for (int64_t i = 0; i < D / 2; ++i) {
      const float co = rot[2 * i], si = rot[2 * i + 1], x0 = src[2 * i], x1 = src[2 * i + 1];
        dst[2 * i] = x0 * co - x1 * si;
        dst[2 * i + 1] = x0 * si + x1 * co;
      }
    }
    if (o.l2_eps >= 0.f) rms_inplace(dst, D, o.l2_eps);
  };
  const int64_t S = c.S, rb = kv_row_bytes(kv_type, D);
  std::vector<float> kr(D);
  for (int64_t b = 0; b < c.B; ++b) {
    const float* rot = cs + (cs_rows ? b : 0) * D;
    for (int64_t h = 0; h < H; ++h) rope(rot, q + b * qstride + h * D, qr + (b * H + h) * D);
    if (o.temp_floor > 0) {  // as model.transformer.Attention: log1p(floor((pos + 1) / floor)) * scale + 1
      const float f = std::log1p(std::floor((static_cast<float>(c.pos[b]) + 1.f) / static_cast<float>(o.temp_floor))) *
                      o.temp_scale + 1.f;
      for (int64_t i = 0; i < H * D; ++i) qr[b * H * D + i] *= f;
    }
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t at = ((c.rows[b] * KV + h) * S + c.pos[b]) * rb;
      rope(rot, k + b * kvstride + h * D, kr.data());
      kv_write(kv_type, kr.data(), D, kc + at);
      kv_write(kv_type, v + b * kvstride + h * D, D, vc + at);
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t group = H / KV;
  const bool fast = resolve_path(path) != PORTABLE && D % (kv_type == KV_Q8_0 ? 32 : 8) == 0;
  at::parallel_for(0, c.B * H, 1, [&](int64_t begin, int64_t stop) {
    thread_local std::vector<float> p, row;
    for (int64_t bh = begin; bh < stop; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = h / group, pos = c.pos[b];
      // the first position this query sees: its chunk's, its window's, or the cache's
      const int64_t start = o.chunk > 0 ? pos / o.chunk * o.chunk : o.window > 0 ? std::max<int64_t>(0, pos - o.window + 1) : 0;
      const int64_t end = pos + 1 - start;
      p.resize(end + 8);
      const float* qh = qr + bh * D;
      const uint8_t* kb = kc + ((c.rows[b] * KV + kvh) * S + start) * rb;
      const uint8_t* vb = vc + ((c.rows[b] * KV + kvh) * S + start) * rb;
      const float* sink = o.sinks != nullptr ? o.sinks + h : nullptr;
      float* oh = out + bh * D;
      if (fast) {
        switch (kv_type) {
          case KV_F32: attend_avx2<RowF32>(qh, kb, vb, rb, end, D, scale, p.data(), oh, sink); break;
          case KV_F16: attend_avx2<RowF16>(qh, kb, vb, rb, end, D, scale, p.data(), oh, sink); break;
          case KV_BF16: attend_avx2<RowBf16>(qh, kb, vb, rb, end, D, scale, p.data(), oh, sink); break;
          default: attend_avx2<RowQ8>(qh, kb, vb, rb, end, D, scale, p.data(), oh, sink); break;
        }
        continue;
      }
      row.resize(D);
      float mx = -INFINITY;
      for (int64_t t = 0; t < end; ++t) {
        kv_read(kv_type, kb + t * rb, D, row.data());
        float dot = 0.f;
        for (int64_t i = 0; i < D; ++i) dot += qh[i] * row[i];
        p[t] = dot * scale;
        mx = std::max(mx, p[t]);
      }
      if (sink != nullptr) mx = std::max(mx, *sink);
      float sum = sink != nullptr ? std::exp(*sink - mx) : 0.f;
      for (int64_t t = 0; t < end; ++t) { p[t] = std::exp(p[t] - mx); sum += p[t]; }
      for (int64_t i = 0; i < D; ++i) oh[i] = 0.f;
      for (int64_t t = 0; t < end; ++t) {
        kv_read(kv_type, vb + t * rb, D, row.data());
        const float w = p[t] / sum;
        for (int64_t i = 0; i < D; ++i) oh[i] += w * row[i];
      }
    }
  });
}

// A layer's k or v cache: (rows, n_kv_heads, positions, row) of one KV type, contiguous, k and v alike.
void check_cache(const at::Tensor& cache, const at::Tensor& like, int64_t n_kv_heads, int64_t D) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && cache.sizes() == like.sizes() &&
                  cache.scalar_type() == like.scalar_type() && cache.size(1) == n_kv_heads,
              "llamalite: KV caches must be contiguous, (rows, n_kv_heads, positions, head_dim), k and v alike");
  const int64_t type = kv_type_of(cache);
  TORCH_CHECK(type != KV_Q8_0 || D % 32 == 0, "llamalite: a q8_0 KV cache needs a head_dim that divides by 32, not ", D,
              "; use --kv-type f16");
  TORCH_CHECK(cache.size(3) * cache.element_size() == kv_row_bytes(type, D), "llamalite: a KV cache row of ",
              cache.size(3) * cache.element_size(), " bytes, not the ", kv_row_bytes(type, D), " of head_dim ", D);
}

// attention_step as an op (one call where the eager path takes about fifteen):
//   q (B, H*D), k and v (B, KV*D), cos_sin (B or 1, D/2, 2), caches (R, KV, S, row) of one KV type; returns
//   (B, H*D). path: BEST, or PORTABLE (the loop that reads a row at a time) for tests.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& cos_sin_in, at::Tensor& cache_k, at::Tensor& cache_v,
                            const at::Tensor& pos_in, const at::Tensor& rows_in, int64_t n_heads, int64_t n_kv_heads,
                            int64_t path) {
  const at::Tensor q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous(), cs = cos_sin_in.to(at::kFloat).contiguous();
  const at::Tensor pos_t = pos_in.to(at::kLong).contiguous(), rows_t = rows_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), D = q.size(1) / n_heads;
  check_cache(cache_k, cache_v, n_kv_heads, D);
  TORCH_CHECK(pos_t.numel() == B && rows_t.numel() == B, "decode_attention: need one position and one cache row a query");
  TORCH_CHECK(cs.dim() == 3 && cs.size(1) * 2 == D && (cs.size(0) == B || cs.size(0) == 1),
              "decode_attention: cos/sin table does not match the batch and head_dim ", D);
  const CacheSlots slots{pos_t.data_ptr<int64_t>(), rows_t.data_ptr<int64_t>(), B, cache_k.size(0), cache_k.size(2)};
  check_slots(slots);
  auto qr = at::empty({B, n_heads * D}, at::kFloat);
  auto out = at::empty({B, n_heads * D}, at::kFloat);
  attention_step(q.data_ptr<float>(), n_heads * D, k.data_ptr<float>(), v.data_ptr<float>(), n_kv_heads * D,
                 cs.data_ptr<float>(), cs.size(0) != 1, static_cast<uint8_t*>(cache_k.data_ptr()),
                 static_cast<uint8_t*>(cache_v.data_ptr()), kv_type_of(cache_k), slots, n_heads, n_kv_heads, D,
                 qr.data_ptr<float>(), out.data_ptr<float>(), path);
  return out;
}

// The paths this CPU runs, best first, as qmatmul_path numbers them.
std::vector<std::pair<std::string, int64_t>> simd_paths() {
  std::vector<std::pair<std::string, int64_t>> out;
  if (has_vnni()) out.push_back({"avx512vnni", VNNI});
  if (has_vnni()) out.push_back({"avx512vnni-gemm", VNNI_GEMM});  // what qmatmul runs for more than MAX_ROWS rows
  if (has_avx2()) out.push_back({"avx2", AVX2});
  out.push_back({"portable", PORTABLE});
  return out;
}

// SiLU(gate) * up for the elements of one row of [gate | up] (2 * hidden wide) in whole vectors of 8;
// returns how many it did. silu(g) = g * sigmoid(g), with e^-|g| so the exponent is never positive.
AVX2_TARGET int64_t silu_mul_avx2(const float* gu, int64_t hidden, float* out) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= hidden; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 z = exp_avx2(_mm256_or_ps(g, sign));  // e^-|g|
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, z));
    const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(z, r), r, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(gu + hidden + i)));
  }
  return i;
}

// SiLU(gate) * up for B rows of [gate | up] into B rows of hidden.
void silu_mul(const float* gu, int64_t B, int64_t hidden, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gu + b * 2 * hidden;
    float* o = out + b * hidden;
    for (int64_t i = has_avx2() ? silu_mul_avx2(g, hidden, o) : 0; i < hidden; ++i) {
      o[i] = g[i] / (1.f + std::exp(-g[i])) * g[hidden + i];
    }
  }
}

// silu_mul as an op: rows of [gate | up] (B, 2 * hidden) -> (B, hidden). The layers' one-token step takes
// it so that it computes SiLU as DecodePlan does: PyTorch's own exp rounds otherwise (MKL's on Intel CPUs).
at::Tensor silu_mul_op(const at::Tensor& gu_in) {
  TORCH_CHECK(gu_in.scalar_type() == at::kFloat && gu_in.dim() == 2 && gu_in.size(1) % 2 == 0,
              "silu_mul: fp32 rows of [gate | up]");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t B = gu.size(0), hidden = gu.size(1) / 2;
  auto out = at::empty({B, hidden}, at::kFloat);
  silu_mul(gu.data_ptr<float>(), B, hidden, out.data_ptr<float>());
  return out;
}

// A weight matrix as a step reads it: repacked blocks of a kernel type, or (type DENSE) fp32 rows.
constexpr int64_t DENSE = -1;

// y (B, N) = x (B, K) @ w.T for one weight, quantized or dense.
void product(const float* x, int64_t B, int64_t K, const at::Tensor& w, int64_t type, float* y, bool add,
             int64_t path) {
  if (type == DENSE) {
    const int64_t N = w.size(0);
    const at::Tensor xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
    at::Tensor yt = at::from_blob(y, {B, N}, at::kFloat);
    if (add) {
      yt.add_(at::mm(xt, w.t()));
    } else {
      at::mm_out(yt, xt, w.t());
    }
    return;
  }
  std::vector<const uint8_t*> bases{w.data_ptr<uint8_t>()};
  std::vector<int64_t> starts{0, w.size(0)};
  qproduct(x, B, K, bases, starts, type, path, y, add);
}

// What some families add to their experts (gpt-oss): biases after each projection, b1 and b3 (E, H) and b2
// (E, K), fp32; and a clamped SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
// g = min(gate, limit), where limit > 0. None of it by default.
struct ExpertExtras {
  const float* b1 = nullptr;
  const float* b3 = nullptr;
  const float* b2 = nullptr;
  float limit = 0.f, alpha = 1.702f;
};

// M rows of [gate | up] of expert e -> M rows of its activation, with the extras (model.transformer.Experts.act).
void expert_act(float* gu, int64_t M, int64_t H, int64_t e, const ExpertExtras& x, float* act) {
  if (x.b1 == nullptr && x.b3 == nullptr && x.limit <= 0.f) {
    silu_mul(gu, M, H, act);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    float* g = gu + m * 2 * H;
    float* u = g + H;
    for (int64_t i = 0; i < H; ++i) {
      if (x.b1 != nullptr) g[i] += x.b1[e * H + i];
      if (x.b3 != nullptr) u[i] += x.b3[e * H + i];
    }
    if (x.limit <= 0.f) {
      silu_mul(g, 1, H, act + m * H);
      continue;
    }
    for (int64_t i = 0; i < H; ++i) {
      const float gate = std::min(g[i], x.limit), up = std::min(std::max(u[i], -x.limit), x.limit);
      act[m * H + i] = (up + 1.f) * gate * (1.f / (1.f + std::exp(-x.alpha * gate)));
    }
  }
}

// experts_product where each chosen expert has at most MAX_ROWS rows: the x rows quantized once, the gate and
// up rows of every chosen expert in one pass (grouped_dots), SiLU, then every chosen expert's down rows in
// another, and the weighted sum, in expert order as experts_product adds.
void experts_grouped(const float* x, int64_t N, int64_t K, const std::vector<std::vector<std::pair<int64_t, float>>>& chosen,
                     const uint8_t* w1, const uint8_t* w3, int64_t t13, const uint8_t* w2, int64_t t2, int64_t H,
                     float* out, int64_t path, const ExpertExtras& extras) {
  const int64_t E = static_cast<int64_t>(chosen.size());
  const int64_t rb13 = row_bytes(t13, K / 32), rb2 = row_bytes(t2, H / 32);
  thread_local std::vector<uint8_t> xscratch, ascratch;
  thread_local std::vector<float> gu, act, y;
  const std::vector<QRow> xq = quantize_rows(x, N, K, path, xscratch);
  std::vector<int64_t> slot(E, -1);  // each chosen expert's first row in gu, act and y
  std::vector<QRow> xs;  // each chosen expert's activation rows, one after another
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (chosen[e].empty()) continue;
    slot[e] = total;
    for (const auto& r : chosen[e]) xs.push_back(xq[r.first]);
    total += static_cast<int64_t>(chosen[e].size());
  }
  gu.resize(total * 2 * H);
  act.resize(total * H);
  y.resize(total * K);
  std::vector<DotJob> jobs;
  for (int64_t e = 0; e < E; ++e) {
    if (slot[e] < 0) continue;
    const int64_t mc = static_cast<int64_t>(chosen[e].size());
    float* g = gu.data() + slot[e] * 2 * H;
    jobs.push_back({w1 + e * H * rb13, H, xs.data() + slot[e], mc, g, 2 * H});
    jobs.push_back({w3 + e * H * rb13, H, xs.data() + slot[e], mc, g + H, 2 * H});
  }
  grouped_dots(t13, K, path, jobs);
  for (int64_t e = 0; e < E; ++e) {
    if (slot[e] >= 0) {
      expert_act(gu.data() + slot[e] * 2 * H, static_cast<int64_t>(chosen[e].size()), H, e, extras,
                 act.data() + slot[e] * H);
    }
  }
  const std::vector<QRow> aq = quantize_rows(act.data(), total, H, path, ascratch);
  jobs.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (slot[e] < 0) continue;
    jobs.push_back({w2 + e * K * rb2, K, aq.data() + slot[e], static_cast<int64_t>(chosen[e].size()),
                    y.data() + slot[e] * K, K});
  }
  grouped_dots(t2, H, path, jobs);
  for (int64_t e = 0; e < E; ++e) {
    for (size_t m = 0; m < chosen[e].size(); ++m) {
      float* o = out + chosen[e][m].first * K;
      const float w = chosen[e][m].second;
      float* ym = y.data() + (slot[e] + m) * K;
      for (int64_t i = 0; i < K && extras.b2 != nullptr; ++i) ym[i] += extras.b2[e * K + i];
      for (int64_t i = 0; i < K; ++i) o[i] += w * ym[i];
    }
  }
}

// A mixture of experts' products for N rows x (N, K): row n goes through its k chosen experts ids[n * k + j],
// each a SwiGLU feed-forward of w1 (gate) and w3 (up) rows e * H .. (e + 1) * H - 1 (repacked, type t13) and w2
// (down) rows e * K .. (e + 1) * K - 1 (type t2), and out[n] += wts[n * k + j] * that expert's output. Rows
// are grouped by expert: each chosen expert's weights are read once for all the rows that chose it, and
// only the chosen experts' rows are read at all.
void experts_product(const float* x, int64_t N, int64_t K, const int64_t* ids, const float* wts, int64_t k,
                     const uint8_t* w1, const uint8_t* w3, int64_t t13, const uint8_t* w2, int64_t t2, int64_t E,
                     int64_t H, float* out, int64_t path, const ExpertExtras& extras = ExpertExtras()) {
  std::vector<std::vector<std::pair<int64_t, float>>> chosen(E);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[n * k + j];
      TORCH_CHECK(e >= 0 && e < E, "experts: expert ", e, " is outside 0..", E - 1);
      chosen[e].push_back({n, wts[n * k + j]});
    }
  }
  const int64_t rb13 = row_bytes(t13, K / 32), rb2 = row_bytes(t2, H / 32);
  int64_t most = 0;
  for (const auto& c : chosen) most = std::max(most, static_cast<int64_t>(c.size()));
  if (most <= MAX_ROWS && path != VNNI_GEMM) {  // a few rows an expert (decode): two parallel passes in all
    experts_grouped(x, N, K, chosen, w1, w3, t13, w2, t2, H, out, path, extras);
    return;
  }
  thread_local std::vector<float> xs, gu, act, y;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t M = static_cast<int64_t>(chosen[e].size());
    if (M == 0) continue;
    xs.resize(M * K);
    gu.resize(M * 2 * H);
    act.resize(M * H);
    y.resize(M * K);
    for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * K, x + chosen[e][m].first * K, K * sizeof(float));
    const int64_t p = path == VNNI && M > MAX_ROWS ? VNNI_GEMM : path;  // as qmatmul: a GEMM for many rows
    qproduct(xs.data(), M, K, {w1 + e * H * rb13, w3 + e * H * rb13}, {0, H, 2 * H}, t13, p, gu.data(), false);
    expert_act(gu.data(), M, H, e, extras, act.data());
    qproduct(act.data(), M, H, {w2 + e * K * rb2}, {0, K}, t2, p, y.data(), false);
    for (int64_t m = 0; m < M; ++m) {
      float* o = out + chosen[e][m].first * K;
      const float w = chosen[e][m].second;
      float* ym = y.data() + m * K;
      for (int64_t i = 0; i < K && extras.b2 != nullptr; ++i) ym[i] += extras.b2[e * K + i];
      for (int64_t i = 0; i < K; ++i) o[i] += w * ym[i];
    }
  }
}

// experts_product as an op: x (N, K) fp32, ids (N, k) int64, weights (N, k) fp32, w1 and w3 (E * H, K) of type
// t13 and w2 (E * K, H) of type t2, repacked -> (N, K).
// With the extras (gpt-oss): the biases b1, b3 (E, H) and b2 (E, K) fp32, or none; the clamped SwiGLU where limit > 0.
at::Tensor experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& wts_in, const at::Tensor& w1,
                   const at::Tensor& w3, const at::Tensor& w2, int64_t t13, int64_t t2, int64_t n_experts, int64_t path,
                   const c10::optional<at::Tensor>& b1, const c10::optional<at::Tensor>& b3,
                   const c10::optional<at::Tensor>& b2, double limit, double alpha) {
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && wts_in.sizes() == ids_in.sizes() && ids_in.size(0) == x_in.size(0),
              "experts: x (N, K), ids and weights (N, k)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), ids = ids_in.to(at::kLong).contiguous();
  const at::Tensor wts = wts_in.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  TORCH_CHECK(n_experts > 0 && w1.size(0) % n_experts == 0 && w2.size(0) == n_experts * K,
              "experts: w1 must hold n_experts * H rows and w2 n_experts * K");
  const int64_t H = w1.size(0) / n_experts;
  check_rows(w1, t13, K, "experts: w1");
  check_rows(w3, t13, K, "experts: w3");
  check_rows(w2, t2, H, "experts: w2");
  TORCH_CHECK(w3.size(0) == w1.size(0), "experts: w1 and w3 must have as many rows");
  ExpertExtras extras;
  extras.limit = static_cast<float>(limit);
  extras.alpha = static_cast<float>(alpha);
  auto bias = [&](const c10::optional<at::Tensor>& b, int64_t width, const char* what) -> const float* {
    if (!b.has_value() || !b->defined()) return nullptr;
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == n_experts * width,
                "experts: ", what, " must be contiguous fp32 (", n_experts, ", ", width, ")");
    return b->data_ptr<float>();
  };
  extras.b1 = bias(b1, H, "b1");
  extras.b3 = bias(b3, H, "b3");
  extras.b2 = bias(b2, K, "b2");
  auto out = at::zeros({N, K}, x.options());
  experts_product(x.data_ptr<float>(), N, K, ids.data_ptr<int64_t>(), wts.data_ptr<float>(), ids.size(1),
                  w1.data_ptr<uint8_t>(), w3.data_ptr<uint8_t>(), t13, w2.data_ptr<uint8_t>(), t2, n_experts, H,
                  out.data_ptr<float>(), resolve_path(path), extras);
  return out;
}

void check_table(const at::Tensor& w, int64_t type, int64_t dim, const char* what) {
  if (type == DENSE) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == dim,
                "DecodePlan: the ", what, " must be a contiguous fp32 (rows, ", dim, ") matrix");
  } else {
    check_rows(w, type, dim, std::string("DecodePlan: the ") + what);
  }
}

// sum a[c] x[c] over whole vectors of 8 (the count done in *done), for LoRA's A product.
AVX2_TARGET float lora_dot_avx2(const float* a, const float* x, int64_t n, int64_t* done) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(x + c), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(x + c + 8), s1);
  }
  for (; c + 8 <= n; c += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(x + c), s0);
  s0 = _mm256_add_ps(s0, s1);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  *done = c;
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

// y[j] += t b[j] over whole vectors of 8; returns the count done. LoRA's B product, a row of Bt at a time.
AVX2_TARGET int64_t lora_axpy_avx2(float* y, float t, const float* b, int64_t n) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(tv, _mm256_loadu_ps(b + j), _mm256_loadu_ps(y + j)));
  return j;
}

// LoRA's low-rank update, unmerged (Hu et al. 2021): y_b += Bt^T (A x_b) for the rows b of each adapter k
// (groups[k]) that has a pair at `slot` (empty tensors where it has none). A (r, in) and Bt (r, out) are
// fp32 and contiguous, the adapter's scale folded into Bt. A step is bound by reading the pairs, so each
// row of A and of Bt is read once for all the rows of its adapter: t_b = A_i . x_b, then y_b += t_b Bt_i,
// in vectors of 8 where the CPU has AVX2.
void lora_add(const float* x, int64_t xs, float* y, int64_t ys, const std::vector<std::vector<int64_t>>& groups,
              const std::vector<std::vector<at::Tensor>>& as, const std::vector<std::vector<at::Tensor>>& bts,
              int64_t slot) {
  const bool avx2 = has_avx2();
  std::vector<float> t;
  for (size_t k = 0; k < groups.size(); ++k) {
    const std::vector<int64_t>& rows = groups[k];
    if (rows.empty() || as[k][slot].numel() == 0) continue;
    const at::Tensor& a_t = as[k][slot];
    const at::Tensor& bt_t = bts[k][slot];
    const int64_t r = a_t.size(0), in = a_t.size(1), out = bt_t.size(1);
    const float* a = a_t.data_ptr<float>();
    const float* bt = bt_t.data_ptr<float>();
    t.resize(rows.size());
    for (int64_t i = 0; i < r; ++i) {
      const float* ai = a + i * in;
      for (size_t n = 0; n < rows.size(); ++n) {
        const float* xb = x + rows[n] * xs;
        int64_t c = 0;
        float dot = avx2 ? lora_dot_avx2(ai, xb, in, &c) : 0.0f;
        for (; c < in; ++c) dot += ai[c] * xb[c];
        t[n] = dot;
      }
      const float* bi = bt + i * out;
      for (size_t n = 0; n < rows.size(); ++n) {
        float* yb = y + rows[n] * ys;
        for (int64_t j = avx2 ? lora_axpy_avx2(yb, t[n], bi, out) : 0; j < out; ++j) yb[j] += t[n] * bi[j];
      }
    }
  }
}
// The sum of a tensor-parallel group's partial products (after wo and after w2: parallel.py), each
// rank ending with the same floats, from inside a DecodePlan step or from Python (all_reduce_).
// Ranks on one machine share a memory region (share): per rank a 64-byte line (its generation and
// process id), then two sets of per-rank slots of `capacity` floats, used in turn. A rank writes its
// part into its slot, publishes the generation, waits for every rank's, and sums the slots in rank
// order (so all ranks get the same bits). Set g is written again only at generation g + 2, after
// every rank has published g + 1, which each does only once it has read set g: no second barrier.
// A waiting rank spins, then yields its core; it fails after `timeout_s`, or as soon as another rank's
// process has gone. Ranks on several machines use a torch.distributed process group instead (use_group).
struct Reducer : torch::CustomClassHolder {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  at::Tensor region;
  int64_t rank, world, capacity = 0, generation = 0;
  double timeout_s, spent = 0;

  Reducer(int64_t rank_, int64_t world_, double timeout_s_) : rank(rank_), world(world_), timeout_s(timeout_s_) {
    TORCH_CHECK(world > 1 && rank >= 0 && rank < world, "Reducer: rank ", rank, " of ", world);
  }

  static int64_t region_bytes(int64_t world, int64_t capacity) {
    return world * 64 + 2 * world * capacity * static_cast<int64_t>(sizeof(float));
  }

  int64_t* line(int64_t r) { return reinterpret_cast<int64_t*>(region.data_ptr<uint8_t>() + r * 64); }
  float* slot(int64_t set, int64_t r) {
    return reinterpret_cast<float*>(region.data_ptr<uint8_t>() + world * 64) + (set * world + r) * capacity;
  }

  // region: a zeroed uint8 mapping of region_bytes(world, capacity) that every rank of the group maps.
  void share(at::Tensor region_, int64_t capacity_) {
    TORCH_CHECK(region_.scalar_type() == at::kByte && region_.is_contiguous() && capacity_ >= 1 &&
                    region_.numel() >= region_bytes(world, capacity_) &&
                    reinterpret_cast<uintptr_t>(region_.data_ptr()) % 64 == 0,
                "Reducer: the shared region must be ", region_bytes(world, capacity_), " bytes, 64-aligned");
    region = std::move(region_);
    capacity = capacity_;
    group.reset();
    __atomic_store_n(line(rank) + 1, static_cast<int64_t>(getpid()), __ATOMIC_RELEASE);
  }

  void use_group(c10::intrusive_ptr<c10d::ProcessGroup> g) {
    group = std::move(g);
    region = at::Tensor();
  }

  bool shares_memory() const { return region.defined(); }
  double seconds() const { return spent; }

  // Whether process `pid` has exited (gone, or a zombie its parent has not reaped yet).
  static bool exited(int64_t pid) {
    if (pid <= 0) return false;
    if (kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
    char path[64], state = 0;
    std::snprintf(path, sizeof path, "/proc/%lld/stat", static_cast<long long>(pid));
    if (FILE* f = std::fopen(path, "r")) {  // "pid (name) state ...": the state follows the last ')'
      char line[512];
      const size_t n = std::fread(line, 1, sizeof line - 1, f);
      std::fclose(f);
      line[n] = 0;
      if (const char* close = std::strrchr(line, ')'); close != nullptr && close[1] == ' ') state = close[2];
    }
    return state == 'Z' || state == 'X';
  }

  void wait_for(int64_t r, int64_t gen, std::chrono::steady_clock::time_point start) {
    int64_t* l = line(r);
    for (int64_t spins = 0; __atomic_load_n(l, __ATOMIC_ACQUIRE) < gen; ++spins) {
      if (spins < 4096) {
        _mm_pause();
        continue;
      }
      sched_yield();
      if (spins % 4096 != 0) continue;
      const int64_t pid = __atomic_load_n(l + 1, __ATOMIC_ACQUIRE);
      TORCH_CHECK(!exited(pid), "llamalite: rank ", r,
                  " of the tensor-parallel group (process ", pid, ") has exited; rank ", rank,
                  " stops too (see that rank's output for why)");
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      TORCH_CHECK(waited < timeout_s, "llamalite: rank ", r, " of the tensor-parallel group did not reach the same "
                  "step within ", timeout_s, " s; is it stuck, or running a different command?");
    }
  }

  void sum(float* x, int64_t n) {
    const auto start = std::chrono::steady_clock::now();
    if (group) {
      std::vector<at::Tensor> ts{at::from_blob(x, {n}, at::kFloat)};
      group->allreduce(ts)->wait();
    } else {
      TORCH_CHECK(region.defined(), "Reducer: share a region or use a group first");
      for (int64_t off = 0; off < n; off += capacity) {
        const int64_t m = std::min(capacity, n - off);
        const int64_t gen = ++generation, set = gen % 2;
        std::memcpy(slot(set, rank), x + off, m * sizeof(float));
        __atomic_store_n(line(rank), gen, __ATOMIC_RELEASE);
        for (int64_t r = 0; r < world; ++r) {
          if (r != rank) wait_for(r, gen, start);
        }
        float* out = x + off;
        std::memcpy(out, slot(set, 0), m * sizeof(float));
        for (int64_t r = 1; r < world; ++r) {
          const float* part = slot(set, r);
          for (int64_t i = 0; i < m; ++i) out[i] += part[i];
        }
      }
    }
    spent += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  // x (any shape, contiguous fp32 on the CPU), summed over the group in place.
  void all_reduce_(at::Tensor x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
                "Reducer: a contiguous fp32 CPU tensor");
    sum(x.data_ptr<float>(), x.numel());
  }
};



// One decode step of the whole model for a batch of single tokens, token ids to logits, with no
// Python and no tensor op between its parts: the embedding row, then per layer
//   h = x + wo(attention(rms_norm(x))), x' = h + w2(silu(w1 n) * w3 n) with n = rms_norm(h),
// (q/k/v and gate/up each one product, the residual adds folded into wo's and w2's products), then
// the final norm and the output layer. model.Transformer.forward is the reference.
// A plan holds the model's tensors (not copies), checked once, so that a step passes only its tokens:
//   embed (V, dim) and out_w (V, dim): repacked blocks of embed_type / out_type, or fp32 (DENSE);
//   inv_freq (head_dim/2,) RoPE's; per layer: norms attention and ffn norm, weights wq wk wv wo w1 w3
//   w2, types of q/k/v, wo, w1/w3 and w2; caches (set_caches, after each setup_caches) k and v.
// LoRA adapters (add_adapter) are served unmerged: step_adapted names each row's adapter.
struct DecodePlan : torch::CustomClassHolder {
  at::Tensor embed, inv_freq, out_norm, out_w;
  at::Tensor rope;  // (positions, D): cos and sin interleaved per frequency, from set_rope; else computed
  std::vector<at::Tensor> norms, weights, caches;
  std::vector<at::Tensor> biases, qk_norms;  // per layer bq bk bv (Qwen2), q_norm k_norm (Qwen3); or none
  std::vector<std::vector<at::Tensor>> lora_a, lora_bt;  // per adapter, per layer wq wk wv wo w1 w3 w2
  c10::intrusive_ptr<Reducer> reducer;  // a tensor-parallel rank's: wo and w2 give partial sums
  std::vector<int64_t> types;
  int64_t embed_type, out_type, n_heads, n_kv_heads, L, dim, D, nq, nk, hidden;  // hidden: the largest layer's
  double eps, out_eps, qk_eps = 0.0;

  // A layer's mixture of experts (set_moe), in place of its dense feed-forward; E == 0: none.
  struct Moe {
    at::Tensor router, w1, w3, w2, shared_gate;
    int64_t router_type = 0, t13 = 0, t2 = 0, E = 0, H = 0, k = 0;
    bool sigmoid = false, norm = false, weight_input = false;
    at::Tensor router_bias, b1, b3, b2;  // gpt-oss's (set_expert_extras), or undefined
    ExpertExtras extras;
  };
  std::vector<at::Tensor> out_bias;  // per layer, a bias after wo (gpt-oss's), or undefined
  std::vector<Moe> moe;
  std::vector<AttnOpts> attn;  // each layer's attention variations (set_attention)
  std::vector<at::Tensor> sinks;  // the tensors attn[l].sinks points into

  // A layer's feed-forward hidden size: its dense one's, or its shared expert's (0: none).
  int64_t hidden_of(int64_t l) const { return weights[7 * l + 4].numel() ? weights[7 * l + 4].size(0) : 0; }

  DecodePlan(at::Tensor embed_, int64_t embed_type_, at::Tensor inv_freq_, std::vector<at::Tensor> norms_,
             std::vector<at::Tensor> weights_, std::vector<int64_t> types_, double eps_, at::Tensor out_norm_,
             double out_eps_, at::Tensor out_w_, int64_t out_type_, int64_t n_heads_, int64_t n_kv_heads_)
      : embed(std::move(embed_)), inv_freq(inv_freq_.to(at::kFloat).contiguous()), out_norm(std::move(out_norm_)),
        out_w(std::move(out_w_)), norms(std::move(norms_)), weights(std::move(weights_)), types(std::move(types_)),
        embed_type(embed_type_), out_type(out_type_), n_heads(n_heads_), n_kv_heads(n_kv_heads_), eps(eps_),
        out_eps(out_eps_) {
    L = static_cast<int64_t>(norms.size()) / 2;
    TORCH_CHECK(L > 0 && static_cast<int64_t>(weights.size()) == 7 * L && static_cast<int64_t>(types.size()) == 4 * L,
                "DecodePlan: per layer 2 norms, 7 weights, 4 types");
    dim = norms[0].numel();
    D = 2 * inv_freq.numel();
    nq = n_heads * D;
    nk = n_kv_heads * D;
    hidden = 0;
    for (int64_t l = 0; l < L; ++l) hidden = std::max(hidden, hidden_of(l));
    moe.resize(L);
    attn.resize(L);
    sinks.resize(L);
    out_bias.resize(L);
    check_table(embed, embed_type, dim, "embedding");
    check_table(out_w, out_type, dim, "output layer");
    TORCH_CHECK(out_norm.scalar_type() == at::kFloat && out_norm.is_contiguous() && out_norm.numel() == dim,
                "DecodePlan: the final norm must be fp32 of ", dim);
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t i : {2 * l, 2 * l + 1}) {
        TORCH_CHECK(norms[i].scalar_type() == at::kFloat && norms[i].is_contiguous() && norms[i].numel() == dim,
                    "DecodePlan: layer ", l, "'s norms must be fp32 of ", dim);
      }
      const at::Tensor* w = weights.data() + 7 * l;
      const int64_t* t = types.data() + 4 * l;
      const int64_t hl = hidden_of(l);
      const int64_t rows[7] = {nq, nk, nk, dim, hl, hl, dim};
      const int64_t cols[7] = {dim, dim, dim, nq, dim, dim, hl};
      const int64_t type[7] = {t[0], t[0], t[0], t[1], t[2], t[2], t[3]};
      // no feed-forward weights: a mixture of experts without a shared expert (set_moe)
      const int n = hl == 0 && w[5].numel() == 0 && w[6].numel() == 0 ? 4 : 7;
      for (int i = 0; i < n; ++i) {
        const std::string what = "DecodePlan: layer " + std::to_string(l) + "'s weight " + std::to_string(i);
        check_rows(w[i], type[i], cols[i], what);
        TORCH_CHECK(w[i].size(0) == rows[i], what, " has ", w[i].size(0), " rows, not ", rows[i]);
      }
    }
  }

  // Layer l's mixture of experts, in place of its dense feed-forward: the router (n_experts, dim) (fp32 DENSE or
  // repacked blocks), the experts' w1 and w3 (n_experts * H, dim) of type t13 and w2 (n_experts * dim, H) of type
  // t2, repacked; each token takes the k experts of the largest router logits, weighted by their softmax over
  // all experts (or the sigmoid of their logits), rescaled to sum to 1 where `norm`. The layer's feed-forward
  // weights given to the constructor, if any, are a shared expert every token goes through, its output scaled
  // by sigmoid(shared_gate . x) where shared_gate (fp32 of dim) is given.
  void set_moe(int64_t l, at::Tensor router, int64_t router_type, at::Tensor w1, at::Tensor w3, at::Tensor w2,
               int64_t t13, int64_t t2, int64_t k, bool sigmoid, bool norm, at::Tensor shared_gate) {
    TORCH_CHECK(l >= 0 && l < L, "DecodePlan: no layer ", l);
    TORCH_CHECK(!reducer, "DecodePlan: a mixture of experts is not split over processes");
    check_table(router, router_type, dim, "router");
    const int64_t E = router.size(0);
    TORCH_CHECK(E > 0 && k > 0 && k <= E && w1.size(0) % E == 0, "DecodePlan: layer ", l, ": ", E, " experts, top ",
                k, ", and w1 rows a multiple of the experts");
    const int64_t H = w1.size(0) / E;
    check_rows(w1, t13, dim, "DecodePlan: experts' w1");
    check_rows(w3, t13, dim, "DecodePlan: experts' w3");
    check_rows(w2, t2, H, "DecodePlan: experts' w2");
    TORCH_CHECK(w3.size(0) == E * H && w2.size(0) == E * dim, "DecodePlan: layer ", l, ": w3 of ", E * H,
                " rows and w2 of ", E * dim);
    TORCH_CHECK(!shared_gate.defined() || shared_gate.numel() == 0 ||
                    (shared_gate.scalar_type() == at::kFloat && shared_gate.is_contiguous() && shared_gate.numel() == dim),
                "DecodePlan: the shared expert's gate must be fp32 of ", dim);
    TORCH_CHECK(shared_gate.numel() == 0 || hidden_of(l) > 0, "DecodePlan: a shared gate without a shared expert");
    moe[l] = Moe{router, w1, w3, w2, shared_gate.numel() ? shared_gate : at::Tensor(), router_type, t13, t2, E, H, k,
                 sigmoid, norm};
  }

  // Layer l's attention variations: RoPE or none; q and k L2-normed after it (l2_eps >= 0); q's temperature by
  // position (temp_floor > 0); chunks or a window of positions (> 0); per-head sink logits (fp32 of n_heads, or
  // empty). As model.transformer.Attention computes them.
  void set_attention(int64_t l, bool rope, double l2_eps, int64_t temp_floor, double temp_scale, int64_t chunk,
                     int64_t window, at::Tensor sink) {
    TORCH_CHECK(l >= 0 && l < L, "DecodePlan: no layer ", l);
    TORCH_CHECK(sink.numel() == 0 || (sink.scalar_type() == at::kFloat && sink.is_contiguous() && sink.numel() == n_heads),
                "DecodePlan: the sinks must be fp32 of ", n_heads);
    sinks[l] = sink;
    attn[l] = AttnOpts{rope, static_cast<float>(l2_eps), temp_floor, static_cast<float>(temp_scale), chunk, window,
                       sink.numel() ? sinks[l].data_ptr<float>() : nullptr};
  }

  // gpt-oss's additions to layer l: a bias after wo (fp32 of dim), and to its experts: a router bias (E), the
  // experts' biases b1, b3 (E, H) and b2 (E, dim), the clamped SwiGLU (limit > 0). Empty tensors: none.
  void set_expert_extras(int64_t l, at::Tensor bo, at::Tensor router_bias, at::Tensor b1, at::Tensor b3, at::Tensor b2,
                         double limit, double alpha) {
    TORCH_CHECK(l >= 0 && l < L, "DecodePlan: no layer ", l);
    auto check = [](const at::Tensor& t, int64_t n, const char* what) {
      TORCH_CHECK(t.numel() == 0 || (t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n),
                  "DecodePlan: ", what, " must be contiguous fp32 of ", n);
    };
    check(bo, dim, "the output bias");
    if (bo.numel()) out_bias[l] = bo;
    if (router_bias.numel() + b1.numel() + b3.numel() + b2.numel() == 0 && limit <= 0) return;
    Moe& m = moe[l];
    TORCH_CHECK(m.E, "DecodePlan: layer ", l, " has no mixture of experts");
    check(router_bias, m.E, "the router bias");
    check(b1, m.E * m.H, "b1");
    check(b3, m.E * m.H, "b3");
    check(b2, m.E * dim, "b2");
    m.router_bias = router_bias, m.b1 = b1, m.b3 = b3, m.b2 = b2;
    m.extras.b1 = b1.numel() ? m.b1.data_ptr<float>() : nullptr;
    m.extras.b3 = b3.numel() ? m.b3.data_ptr<float>() : nullptr;
    m.extras.b2 = b2.numel() ? m.b2.data_ptr<float>() : nullptr;
    m.extras.limit = static_cast<float>(limit);
    m.extras.alpha = static_cast<float>(alpha);
  }

  // Layer l's experts weighted on their input (Llama 4): expert(x * w) in place of w * expert(x).
  void set_weight_input(int64_t l, bool on) {
    TORCH_CHECK(l >= 0 && l < L && moe[l].E, "DecodePlan: layer ", l, " has no mixture of experts");
    moe[l].weight_input = on;
  }

  void set_caches(std::vector<at::Tensor> c) {
    TORCH_CHECK(static_cast<int64_t>(c.size()) == 2 * L, "DecodePlan: need a k and a v cache per layer");
    for (const at::Tensor& t : c) check_cache(t, c[0], n_kv_heads, D);
    caches = std::move(c);
  }

  // RoPE's cos and sin for positions 0 .. P-1, (P, D/2, 2) fp32 as torch.view_as_real of the model's
  // e^(i*angle): the step then rotates by the very values the model's own forward computes. Its cos and
  // sin come from PyTorch's math library (MKL's on Intel CPUs), which rounds otherwise than the C
  // library's std::cos on some hosts; a step computing its own differed from the layers' by 1e-5.
  void set_rope(const at::Tensor& table) {
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.dim() == 3 &&
                    table.size(1) == D / 2 && table.size(2) == 2,
                "DecodePlan: the RoPE table must be contiguous fp32 (positions, ", D / 2, ", 2)");
    rope = table;
  }

  // What some families add to a layer's q, k and v before RoPE: per layer the biases bq, bk, bv (fp32, of
  // nq, nk, nk; Qwen2), and/or RMSNorm weights of one head for q and for k (fp32, of D; Qwen3), each list
  // empty where the family has none.
  void set_extras(std::vector<at::Tensor> b, std::vector<at::Tensor> qk, double qk_eps_) {
    TORCH_CHECK(b.empty() || static_cast<int64_t>(b.size()) == 3 * L, "DecodePlan: 3 biases per layer, or none");
    TORCH_CHECK(qk.empty() || static_cast<int64_t>(qk.size()) == 2 * L, "DecodePlan: 2 head norms per layer, or none");
    for (size_t i = 0; i < b.size(); ++i) {
      const int64_t want = i % 3 == 0 ? nq : nk;
      TORCH_CHECK(b[i].scalar_type() == at::kFloat && b[i].is_contiguous() && b[i].numel() == want,
                  "DecodePlan: layer ", i / 3, "'s bias ", i % 3, " must be fp32 of ", want);
    }
    for (size_t i = 0; i < qk.size(); ++i) {
      TORCH_CHECK(qk[i].scalar_type() == at::kFloat && qk[i].is_contiguous() && qk[i].numel() == D,
                  "DecodePlan: layer ", i / 2, "'s head norm ", i % 2, " must be fp32 of ", D);
    }
    biases = std::move(b);
    qk_norms = std::move(qk);
    qk_eps = qk_eps_;
  }

  // A rank of a tensor-parallel group: its weights are its slices (parallel.Split), and the products of
  // wo and w2 are summed over the group (each rank then adds the same sums to its residual stream).
  void set_reducer(c10::intrusive_ptr<Reducer> r) {
    for (const Moe& m : moe) TORCH_CHECK(m.E == 0, "DecodePlan: a mixture of experts is not split over processes");
    reducer = std::move(r);
  }

  // Adapter `index` (the next one: 0, 1, ...): per layer 7 A (r, in) and 7 Bt (r, out) in the weights' order
  // (wq wk wv wo w1 w3 w2), each pair empty where the adapter leaves that weight alone.
  void add_adapter(int64_t index, std::vector<at::Tensor> as, std::vector<at::Tensor> bts) {
    TORCH_CHECK(index == static_cast<int64_t>(lora_a.size()), "DecodePlan: adapters are added in order");
    TORCH_CHECK(!reducer, "DecodePlan: adapters are not served on a model split over processes");
    TORCH_CHECK(static_cast<int64_t>(as.size()) == 7 * L && static_cast<int64_t>(bts.size()) == 7 * L,
                "DecodePlan: an adapter has 7 (A, Bt) pairs per layer");
    for (int64_t i = 0; i < 7 * L; ++i) {
      const int64_t l = i / 7, j = i % 7;
      const int64_t hl = hidden_of(l);
      const int64_t rows[7] = {nq, nk, nk, dim, hl, hl, dim};
      const int64_t cols[7] = {dim, dim, dim, nq, dim, dim, hl};
      if (as[i].numel() == 0 && bts[i].numel() == 0) continue;
      TORCH_CHECK(j < 4 || moe[l].E == 0, "DecodePlan: adapter ", index, " layer ", l,
                  ": adapters on a mixture of experts' feed-forward are not run in the step");
      TORCH_CHECK(as[i].dim() == 2 && bts[i].dim() == 2 && as[i].scalar_type() == at::kFloat &&
                      bts[i].scalar_type() == at::kFloat && as[i].is_contiguous() && bts[i].is_contiguous() &&
                      as[i].size(0) == bts[i].size(0) && as[i].size(1) == cols[j] && bts[i].size(1) == rows[j],
                  "DecodePlan: adapter ", index, " layer ", l, " weight ", j, ": A must be fp32 (r, ", cols[j],
                  ") and Bt (r, ", rows[j], "), contiguous");
    }
    lora_a.push_back(std::move(as));
    lora_bt.push_back(std::move(bts));
  }

  // tokens, pos, rows (B,): each token, its position and its cache row -> logits (B, V).
  at::Tensor step(const at::Tensor& tokens_in, const at::Tensor& pos_in, const at::Tensor& rows_in) {
    return run(tokens_in, pos_in, rows_in, nullptr);
  }

  // A pipeline stage's step (parallel.pipeline): its layers only, from the previous stage's hidden states
  // (B, dim) instead of the embedding when `hidden` is not empty, and to the logits only when `head` (the
  // last stage), else to the hidden states it hands on (B, dim).
  at::Tensor step_stage(const at::Tensor& tokens_in, const at::Tensor& pos_in, const at::Tensor& rows_in,
                        const at::Tensor& hidden, bool head) {
    return run(tokens_in, pos_in, rows_in, nullptr, hidden.numel() ? &hidden : nullptr, head);
  }

  // The same with each row's adapter (B,): an index of add_adapter, or -1 for the base model.
  at::Tensor step_adapted(const at::Tensor& tokens_in, const at::Tensor& pos_in, const at::Tensor& rows_in,
                          const at::Tensor& adapters_in) {
    const at::Tensor which_t = adapters_in.to(at::kLong).contiguous();
    TORCH_CHECK(which_t.numel() == tokens_in.numel(), "DecodePlan: need one adapter (or -1) a token");
    const int64_t* which = which_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < which_t.numel(); ++b) {
      TORCH_CHECK(which[b] >= -1 && which[b] < static_cast<int64_t>(lora_a.size()), "DecodePlan: adapter ",
                  which[b], " was never added");
    }
    std::vector<std::vector<int64_t>> groups(lora_a.size());
    for (int64_t b = 0; b < which_t.numel(); ++b) {
      if (which[b] >= 0) groups[which[b]].push_back(b);
    }
    return run(tokens_in, pos_in, rows_in, &groups);
  }

  // A mixture of experts' output for B normed rows n (B, dim) into out (B, dim), as model.MoEFeedForward computes
  // it: the router's choice (route), the chosen experts' weighted sum, plus the shared expert (gu, act and y:
  // scratch of 2 * hidden, hidden and dim a row).
  void mixture(const Moe& m, const at::Tensor* w, const int64_t* t, const float* n, int64_t B, float* gu, float* act,
               float* out, float* y, int64_t path) {
    std::vector<float> logits(B * m.E), wts(B * m.k);
    std::vector<int64_t> ids(B * m.k), order(m.E);
    product(n, B, dim, m.router, m.router_type, logits.data(), false, path);
    for (int64_t b = 0; b < B; ++b) {
      float* lg = logits.data() + b * m.E;
      for (int64_t e = 0; e < m.E && m.router_bias.defined(); ++e) lg[e] += m.router_bias.data_ptr<float>()[e];
      if (!m.sigmoid) {  // softmax over all the experts
        const float top = *std::max_element(lg, lg + m.E);
        float sum = 0.f;
        for (int64_t e = 0; e < m.E; ++e) sum += (lg[e] = std::exp(lg[e] - top));
        for (int64_t e = 0; e < m.E; ++e) lg[e] /= sum;
      }
      for (int64_t e = 0; e < m.E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + m.k, order.end(),  // the largest first; ties: the lower id
                        [lg](int64_t a, int64_t c) { return lg[a] > lg[c] || (lg[a] == lg[c] && a < c); });
      float sum = 0.f;
      for (int64_t j = 0; j < m.k; ++j) {
        const float v = lg[order[j]];
        wts[b * m.k + j] = m.sigmoid ? 1.f / (1.f + std::exp(-v)) : v;
        ids[b * m.k + j] = order[j];
        sum += wts[b * m.k + j];
      }
      for (int64_t j = 0; j < m.k && m.norm; ++j) wts[b * m.k + j] /= sum;
    }
    std::fill(out, out + B * dim, 0.f);
    if (m.weight_input) {  // each (row, expert) its own input row x * w, its output added unweighted
      std::vector<float> xin(B * m.k * dim), ones(B * m.k, 1.f), each(B * m.k * dim, 0.f);
      for (int64_t r = 0; r < B * m.k; ++r) {
        for (int64_t i = 0; i < dim; ++i) xin[r * dim + i] = n[r / m.k * dim + i] * wts[r];
      }
      experts_product(xin.data(), B * m.k, dim, ids.data(), ones.data(), 1, m.w1.data_ptr<uint8_t>(),
                      m.w3.data_ptr<uint8_t>(), m.t13, m.w2.data_ptr<uint8_t>(), m.t2, m.E, m.H, each.data(), path,
                      m.extras);
      for (int64_t r = 0; r < B * m.k; ++r) {
        for (int64_t i = 0; i < dim; ++i) out[r / m.k * dim + i] += each[r * dim + i];
      }
    } else {
      experts_product(n, B, dim, ids.data(), wts.data(), m.k, m.w1.data_ptr<uint8_t>(), m.w3.data_ptr<uint8_t>(),
                      m.t13, m.w2.data_ptr<uint8_t>(), m.t2, m.E, m.H, out, path, m.extras);
    }
    const int64_t hs = w[4].numel() ? w[4].size(0) : 0;
    if (hs == 0) return;
    qproduct(n, B, dim, {w[4].data_ptr<uint8_t>(), w[5].data_ptr<uint8_t>()}, {0, hs, 2 * hs}, t[2], path, gu, false);
    silu_mul(gu, B, hs, act);
    product(act, B, hs, w[6], t[3], y, false, path);
    for (int64_t b = 0; b < B; ++b) {
      float g = 1.f;
      if (m.shared_gate.defined()) {
        const float* sg = m.shared_gate.data_ptr<float>();
        float z = 0.f;
        for (int64_t i = 0; i < dim; ++i) z += sg[i] * n[b * dim + i];
        g = 1.f / (1.f + std::exp(-z));
      }
      for (int64_t i = 0; i < dim; ++i) out[b * dim + i] += g * y[b * dim + i];
    }
  }

  at::Tensor run(const at::Tensor& tokens_in, const at::Tensor& pos_in, const at::Tensor& rows_in,
                 const std::vector<std::vector<int64_t>>* adapters, const at::Tensor* hidden_in = nullptr,
                 bool head = true) {
    TORCH_CHECK(!caches.empty(), "DecodePlan: set_caches first");
    const at::Tensor tokens_t = tokens_in.to(at::kLong).contiguous(), pos_t = pos_in.to(at::kLong).contiguous();
    const at::Tensor rows_t = rows_in.to(at::kLong).contiguous();
    const int64_t B = tokens_t.numel();
    TORCH_CHECK(pos_t.numel() == B && rows_t.numel() == B, "DecodePlan: need one position and one cache row a token");
    const int64_t* tokens = tokens_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tokens[b] >= 0 && tokens[b] < embed.size(0), "DecodePlan: token ", tokens[b],
                  " is outside the vocabulary of ", embed.size(0));
    }
    const CacheSlots slots{pos_t.data_ptr<int64_t>(), rows_t.data_ptr<int64_t>(), B, caches[0].size(0),
                           caches[0].size(2)};
    check_slots(slots);
    const int64_t path = resolve_path(BEST);

    // Activations: the residual stream h, a normed copy n, [q|k|v], rotated q, attention out, [gate|up], act.
    // Split over a group: wo's and w2's partial products (part) are summed before they are added to h.
    auto buf = at::empty({B * (5 * dim + nq + 2 * nk + 2 * nq + 3 * hidden)}, at::kFloat);
    float* h = buf.data_ptr<float>();
    float* n = h + B * dim;
    float* qkv = n + B * dim;
    float* qr = qkv + B * (nq + 2 * nk);
    float* att = qr + B * nq;
    float* gu = att + B * nq;
    float* act = gu + B * 2 * hidden;
    float* part = act + B * hidden;
    float* mixed = part + B * dim;  // a mixture of experts' output, before it joins h
    float* shared = mixed + B * dim;
    Reducer* sum = reducer.get();
    auto add_summed = [&](const float* x, int64_t K, const at::Tensor& w, int64_t type) {  // h += the group's x @ w.T
      if (sum == nullptr) {
        product(x, B, K, w, type, h, true, path);
        return;
      }
      product(x, B, K, w, type, part, false, path);
      sum->sum(part, B * dim);
      for (int64_t i = 0; i < B * dim; ++i) h[i] += part[i];
    };

    if (hidden_in != nullptr) {  // a later pipeline stage: the previous stage's hidden states
      TORCH_CHECK(hidden_in->scalar_type() == at::kFloat && hidden_in->is_contiguous() && hidden_in->numel() == B * dim,
                  "DecodePlan: the hidden states handed in must be contiguous fp32 (", B, ", ", dim, ")");
      std::memcpy(h, hidden_in->data_ptr<float>(), B * dim * sizeof(float));
    }
    for (int64_t b = 0; b < B && hidden_in == nullptr; ++b) {  // the embedding rows
      if (embed_type == DENSE) {
        std::memcpy(h + b * dim, embed.data_ptr<float>() + tokens[b] * dim, dim * sizeof(float));
      } else {
        const int64_t nb = dim / 32;
        const uint8_t* row = embed.data_ptr<uint8_t>() + tokens[b] * row_bytes(embed_type, nb);
        dequant_row(embed_type, packed_row(embed_type, row, nb), nb, h + b * dim);
      }
    }
    // RoPE's cos and sin per row, as the model computes them: angle = float(pos) * inv_freq.
    std::vector<float> cs(B * D);
    for (int64_t b = 0; b < B && rope.defined(); ++b) {
      TORCH_CHECK(slots.pos[b] < rope.size(0), "DecodePlan: position ", slots.pos[b], " is past the RoPE table of ",
                  rope.size(0));
      std::memcpy(cs.data() + b * D, rope.data_ptr<float>() + slots.pos[b] * D, D * sizeof(float));
    }
    for (int64_t b = 0; b < B && !rope.defined(); ++b) {
      for (int64_t i = 0; i < D / 2; ++i) {
        const float angle = static_cast<float>(slots.pos[b]) * inv_freq.data_ptr<float>()[i];
        cs[b * D + 2 * i] = std::cos(angle);
        cs[b * D + 2 * i + 1] = std::sin(angle);
      }
    }
    std::vector<const uint8_t*> bases;
    std::vector<int64_t> starts;
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = weights.data() + 7 * l;
      const int64_t* t = types.data() + 4 * l;
      rms_rows(h, norms[2 * l].data_ptr<float>(), n, B, dim, static_cast<float>(eps));
      const int64_t qs = nq + 2 * nk;  // a row of [q|k|v]
      bases = {w[0].data_ptr<uint8_t>(), w[1].data_ptr<uint8_t>(), w[2].data_ptr<uint8_t>()};
      starts = {0, nq, nq + nk, qs};
      qproduct(n, B, dim, bases, starts, t[0], path, qkv, false);
      if (adapters != nullptr) {
        lora_add(n, dim, qkv, qs, *adapters, lora_a, lora_bt, 7 * l);
        lora_add(n, dim, qkv + nq, qs, *adapters, lora_a, lora_bt, 7 * l + 1);
        lora_add(n, dim, qkv + nq + nk, qs, *adapters, lora_a, lora_bt, 7 * l + 2);
      }
      for (int64_t b = 0; b < B && !biases.empty(); ++b) {  // + bq, bk, bv
        float* row = qkv + b * qs;
        for (int j = 0; j < 3; ++j) {
          const float* bias = biases[3 * l + j].data_ptr<float>();
          for (int64_t i = starts[j]; i < starts[j + 1]; ++i) row[i] += bias[i - starts[j]];
        }
      }
      for (int64_t b = 0; b < B && !qk_norms.empty(); ++b) {  // each head of q and of k normed, in place
        float* row = qkv + b * qs;
        rms_rows(row, qk_norms[2 * l].data_ptr<float>(), row, n_heads, D, static_cast<float>(qk_eps));
        rms_rows(row + nq, qk_norms[2 * l + 1].data_ptr<float>(), row + nq, n_kv_heads, D, static_cast<float>(qk_eps));
      }
      attention_step(qkv, qs, qkv + nq, qkv + nq + nk, qs, cs.data(), true,
                     static_cast<uint8_t*>(caches[2 * l].data_ptr()), static_cast<uint8_t*>(caches[2 * l + 1].data_ptr()),
                     kv_type_of(caches[0]), slots, n_heads, n_kv_heads,
                     D, qr, att, path, attn[l]);
      add_summed(att, nq, w[3], t[1]);  // h += wo(att)
      if (out_bias[l].defined()) {
        const float* bo = out_bias[l].data_ptr<float>();
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < dim; ++i) h[b * dim + i] += bo[i];
        }
      }
      if (adapters != nullptr) lora_add(att, nq, h, dim, *adapters, lora_a, lora_bt, 7 * l + 3);
      rms_rows(h, norms[2 * l + 1].data_ptr<float>(), n, B, dim, static_cast<float>(eps));
      if (moe[l].E) {
        mixture(moe[l], w, t, n, B, gu, act, mixed, shared, path);
        for (int64_t i = 0; i < B * dim; ++i) h[i] += mixed[i];
        continue;
      }
      const int64_t hidden = hidden_of(l);
      bases = {w[4].data_ptr<uint8_t>(), w[5].data_ptr<uint8_t>()};
      starts = {0, hidden, 2 * hidden};
      qproduct(n, B, dim, bases, starts, t[2], path, gu, false);
      if (adapters != nullptr) {
        lora_add(n, dim, gu, 2 * hidden, *adapters, lora_a, lora_bt, 7 * l + 4);
        lora_add(n, dim, gu + hidden, 2 * hidden, *adapters, lora_a, lora_bt, 7 * l + 5);
      }
      silu_mul(gu, B, hidden, act);
      add_summed(act, hidden, w[6], t[3]);  // h += w2(act)
      if (adapters != nullptr) lora_add(act, hidden, h, dim, *adapters, lora_a, lora_bt, 7 * l + 6);
    }
    if (!head) return buf.narrow(0, 0, B * dim).view({B, dim}).clone();
    rms_rows(h, out_norm.data_ptr<float>(), n, B, dim, static_cast<float>(out_eps));
    auto logits = at::empty({B, out_w.size(0)}, at::kFloat);
    product(n, B, dim, out_w, out_type, logits.data_ptr<float>(), false, path);
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY(llamalite, m) {
  m.def("repack(Tensor w, int qtype) -> Tensor");
  m.def("repack_(Tensor(a!) w, int qtype) -> ()");
  m.def("qmatmul(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("qmatmul_path(Tensor x, Tensor w, int qtype, int path) -> Tensor");
  m.def("qmatmul_multi(Tensor x, Tensor[] ws, int qtype) -> Tensor");
  m.def("dequantize(Tensor w, int qtype) -> Tensor");
  m.def("mxfp4_as_q8_0(Tensor raw) -> Tensor");
  m.def("quantize_q8_0(Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("experts(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2, int t13, int t2, int n_experts, "
        "int path=0, Tensor? b1=None, Tensor? b3=None, Tensor? b2=None, float limit=0., float alpha=1.702) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos_sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "Tensor pos, Tensor rows, int n_heads, int n_kv_heads, int path=0) -> Tensor");
  m.class_<Reducer>("Reducer")
      .def(torch::init<int64_t, int64_t, double>())
      .def_static("region_bytes", &Reducer::region_bytes)
      .def("share", &Reducer::share)
      .def("use_group", &Reducer::use_group)
      .def("shares_memory", &Reducer::shares_memory)
      .def("seconds", &Reducer::seconds)
      .def("all_reduce_", &Reducer::all_reduce_);
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<at::Tensor, int64_t, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>, double, at::Tensor, double, at::Tensor, int64_t, int64_t, int64_t>())
      .def("set_caches", &DecodePlan::set_caches)
      .def("set_rope", &DecodePlan::set_rope)
      .def("step", &DecodePlan::step)
      .def("step_stage", &DecodePlan::step_stage)
      .def("set_reducer", &DecodePlan::set_reducer)
      .def("set_extras", &DecodePlan::set_extras)
      .def("set_moe", &DecodePlan::set_moe)
      .def("set_attention", &DecodePlan::set_attention)
      .def("set_weight_input", &DecodePlan::set_weight_input)
      .def("set_expert_extras", &DecodePlan::set_expert_extras)
      .def("add_adapter", &DecodePlan::add_adapter)
      .def("step_adapted", &DecodePlan::step_adapted);
}

TORCH_LIBRARY_IMPL(llamalite, CPU, m) {
  m.impl("repack", &repack);
  m.impl("repack_", &repack_);
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_path", &qmatmul_path);
  m.impl("qmatmul_multi", &qmatmul_multi);
  m.impl("dequantize", &dequantize);
  m.impl("mxfp4_as_q8_0", &mxfp4_as_q8_0);
  m.impl("quantize_q8_0", &quantize_q8_0);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul_op);
  m.impl("experts", &experts);
  m.impl("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("simd_paths", &simd_paths); }
