"""The fast decode path (CPU): a KV cache whose crop is free, a lean forward for the Llama/Qwen2
family that reads the HF weights, and a few compiled fp32 kernels for the few-row steps.

Why (measured on the demo pair, 1 thread): HF's eager forward spends ~1/3 of a decode step in
Python wrappers (mask building, cache objects, module hooks), and MKL's fp32 GEMM runs well
below the memory bandwidth at 2-9 rows, so a 5-token verify cost ~1.5 decode steps. Here:
  - KVCache: K/V preallocated per layer [H_kv, cap, D]; crop(-n) moves the end (no copy).
  - LeanLM: y = lm_head(norm(x_L)), x_l = x + attn(norm(x)), x = x + mlp(norm(x)), in plain
    torch; q,k,v and gate,up fused for a frozen model (one GEMM each).
  - Compiled kernels (AVX-512, built once with the system C++ compiler, cached under
    ~/.cache/onlinespec/kernels; ONLINESPEC_NO_KERNEL=1, no AVX-512 or no compiler -> torch):
    PackedLinear's few-row GEMM on a blocked copy of W that streams it once for up to 6 rows
    (a 5-row step costs about what one row does: both read the weights once), RMSNorm, RoPE +
    the cache write, and the new tokens' causal attention (flush-to-zero inside each call).
    Without them: x @ W^T with W^T stored contiguous (MKL never repacks B) and torch ops.
Any other causal LM keeps HF's forward, with its nn.Linear / Conv1D layers packed in place and
an all-full-attention DynamicCache (a sliding-window layer cannot roll back k tokens).
Only on CPU: on CUDA the plain HF path runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.activations import ACT2FN

LEAN_TYPES = ("llama", "qwen2", "mistral")
ATTR = "_onlinespec_fast"


def fast_supported(model: PreTrainedModel) -> bool:
    """The fast path is CPU-only (MKL packing, eager SDPA)."""
    return next(model.parameters()).device.type == "cpu"


# A few-row fp32 GEMM that reads each weight once (AVX-512; compiled on first use with the
# system C++ compiler, cached per source/compiler; absent compiler or CPU support -> MKL).
# y[M, N] = x[M, K] @ W^T (+ b), W packed once as wp[ceil(N/64)][K][64] (zero-padded tail), so
# the weight streams contiguously; each 64-column block keeps up to 6 rows x 64 outputs in 24
# zmm accumulators (7+ rows: its two 32-column halves in turn, 12 rows a pass; the second half
# and further passes read the block from cache). Every output is one
# fp32 FMA chain over k in order: not MKL's summation order, so not bit-identical to F.linear
# (neither is x @ W^T), with the same error size (|err| vs fp64 ~1e-6 on the demo weights).
# Why: one decode row is memory-bound (the demo target's 68 MB of weights take as long as a
# plain read of them); MKL's sgemm at 2-9 rows runs well below that bandwidth.
_GEMM_SRC = r"""
#include <immintrin.h>
#include <cmath>
#include <cstdint>
// flush-to-zero + denormals-are-zero inside each call, restored on return: a denormal operand
// or result (tiny attention weights, silu far below 0) costs a microcode assist of ~100+ cycles
// (measured: attention in the demo forward 60 -> 13 us a layer); they are below 1.2e-38, so
// flushing them changes no normal-range result
struct Ftz {
    unsigned int csr;
    Ftz() : csr(_mm_getcsr()) { _mm_setcsr(csr | 0x8040); }
    ~Ftz() { _mm_setcsr(csr); }
};
// NV 16-float vectors of one 64-column block (row stride 64 floats), MR rows of x. k runs in
// chunks of 64: each chunk's sum starts from zero and is added to the row's running total in y
// (what a blocked GEMM does; the error of one chain over all K would grow ~3x more at K = 1152)
template <int MR, int NV, bool PF = true>
static inline void block(const float* x, int64_t K, const float* w, float* y, int64_t ldy,
                         int64_t ncols, const float* bias) {
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
        int64_t k1 = K - k0 > 64 ? k0 + 64 : K;
        __m512 acc[MR][NV];
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; ++k) {
            const float* wk = w + k * 64;
            __m512 wv[NV];
            for (int j = 0; j < NV; ++j) {
                if (PF) {  // near into L1, far into L2: more misses in flight than one stream
                    _mm_prefetch((const char*)(wk + 1024 + 16 * j), _MM_HINT_T0);
                    _mm_prefetch((const char*)(wk + 8192 + 16 * j), _MM_HINT_T2);
                }
                wv[j] = _mm512_loadu_ps(wk + 16 * j);
            }
            for (int m = 0; m < MR; ++m) {
                __m512 xb = _mm512_set1_ps(x[m * K + k]);
                for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
            }
        }
        for (int j = 0; j < NV; ++j) {
            int64_t c0 = j * 16;
            if (c0 >= ncols) break;
            int64_t nc = ncols - c0 < 16 ? ncols - c0 : 16;
            __mmask16 mk = (__mmask16)((1u << nc) - 1u);
            __m512 b = bias && k1 == K ? _mm512_maskz_loadu_ps(mk, bias + c0) : _mm512_setzero_ps();
            for (int m = 0; m < MR; ++m) {
                float* ym = y + m * ldy + c0;
                __m512 t = k0 == 0 ? acc[m][j] : _mm512_add_ps(_mm512_maskz_loadu_ps(mk, ym), acc[m][j]);
                _mm512_mask_storeu_ps(ym, mk, bias && k1 == K ? _mm512_add_ps(t, b) : t);
            }
        }
    }
}
#define CASE(R, NV) case R: block<R, NV>(xm, K, w, ym, N, nc, bb); break;
extern "C" void os_gemm(const float* x, int64_t M, int64_t K, const float* wp, int64_t N,
                        const float* bias, float* y) {
    Ftz ftz;
    int64_t NB = (N + 63) / 64;
    for (int64_t nb = 0; nb < NB; ++nb) {
        int64_t ncols = N - nb * 64 < 64 ? N - nb * 64 : 64;
        if (M <= 6) {  // the whole 64-column block, all rows: 24 accumulators at most
            const float* w = wp + nb * K * 64;
            const float* bb = bias ? bias + nb * 64 : nullptr;
            const float* xm = x; float* ym = y + nb * 64; int64_t nc = ncols;
            switch (M) { CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 4) CASE(6, 4) }
            continue;
        }
        for (int64_t h = 0; h < 2; ++h) {  // 7+ rows: two 32-column halves, 12 rows a pass
            int64_t nc = ncols - 32 * h;
            if (nc <= 0) break;
            const float* w = wp + nb * K * 64 + 32 * h;
            const float* bb = bias ? bias + nb * 64 + 32 * h : nullptr;
            for (int64_t m = 0; m < M; m += 12) {
                const float* xm = x + m * K; float* ym = y + m * N + nb * 64 + 32 * h;
                switch (M - m >= 12 ? 12 : M - m) {
                    CASE(1, 2) CASE(2, 2) CASE(3, 2) CASE(4, 2) CASE(5, 2) CASE(6, 2)
                    CASE(7, 2) CASE(8, 2) CASE(9, 2) CASE(10, 2) CASE(11, 2) CASE(12, 2)
                }
            }
        }
    }
}
// y = w * (x * (1 / sqrt(mean(x^2) + eps))) per row of x [n, h]: HF's RMSNorm in fp32, each
// step rounded as torch does (x*x, sum, / h, + eps, sqrt, 1/., two multiplies); only the sum's
// order differs (16 lanes, then the lanes in order)
extern "C" void os_rms_norm(const float* x, const float* w, float* y, int64_t n, int64_t h,
                            float eps) {
    Ftz ftz;
    for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * h;
        float* yi = y + i * h;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < h; j += 16) {
            __mmask16 mk = h - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (h - j)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(mk, xi + j);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        float lanes[16];
        _mm512_storeu_ps(lanes, acc);
        float ss = 0.0f;
        for (int l = 0; l < 16; ++l) ss += lanes[l];
        float r = 1.0f / __builtin_sqrtf(ss / (float)h + eps);
        for (int64_t j = 0; j < h; ++j) yi[j] = w[j] * (xi[j] * r);
    }
}
// RoPE (HF's rotate_half: x*cos + [-x2, x1]*sin, multiplies and the add rounded separately) on
// n rows of q [n, hq*d] and k [n, hkv*d] (row strides qs, ks, vs); q -> qo [hq, n, d]; k and v
// -> rows start.. of the caches kc, vc [hkv, cap, d]
static inline void rot(const float* x, const float* c, const float* s, float* o, int64_t d) {
    int64_t half = d / 2;
    for (int64_t j = 0; j < half; ++j) o[j] = x[j] * c[j] + (-x[j + half]) * s[j];
    for (int64_t j = half; j < d; ++j) o[j] = x[j] * c[j] + x[j - half] * s[j];
}
extern "C" void os_rope_kv(const float* q, int64_t qs, const float* k, int64_t ks,
                           const float* v, int64_t vs, int64_t n, int64_t hq, int64_t hkv,
                           int64_t d, const float* cos, const float* sin, float* qo, float* kc,
                           float* vc, int64_t cap, int64_t start, float* kb) {
    Ftz ftz;
    for (int64_t i = 0; i < n; ++i) {
        const float* c = cos + i * d;
        const float* s = sin + i * d;
        for (int64_t h = 0; h < hq; ++h) rot(q + i * qs + h * d, c, s, qo + (h * n + i) * d, d);
        for (int64_t h = 0; h < hkv; ++h) {
            int64_t t = start + i;
            float* ko = kc + (h * cap + t) * d;
            rot(k + i * ks + h * d, c, s, ko, d);
            if (kb) {  // K^T in the GEMM's blocked layout: kb[h][t / 64][j][t % 64]
                float* kbt = kb + ((h * (cap / 64) + t / 64) * d) * 64 + t % 64;
                for (int64_t j = 0; j < d; ++j) kbt[j * 64] = ko[j];
            }
            const float* vi = v + i * vs + h * d;
            float* vo = vc + (h * cap + t) * d;
            for (int64_t j = 0; j < d; ++j) vo[j] = vi[j];
        }
    }
}
static inline __m512 exp512(__m512 x) {  // Cephes expf: ~1 ulp on [-88, 88]
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, fx);
}
// sum_t p[r][t] v[t] for MR rows of p (row stride ldp), t < L; v rows of d = 16 DV floats
template <int MR, int DV>
static inline void pv(const float* p, int64_t ldp, const float* v, int64_t d, int64_t L,
                      const float* inv, float* out, const int64_t* orow) {
    __m512 acc[MR][DV];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < DV; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
        __m512 vv[DV];
        for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_ps(v + t * d + 16 * j);
        for (int m = 0; m < MR; ++m) {
            __m512 pb = _mm512_set1_ps(p[m * ldp + t]);
            for (int j = 0; j < DV; ++j) acc[m][j] = _mm512_fmadd_ps(pb, vv[j], acc[m][j]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        __m512 s = _mm512_set1_ps(inv[m]);
        for (int j = 0; j < DV; ++j) _mm512_storeu_ps(out + orow[m] + 16 * j, _mm512_mul_ps(acc[m][j], s));
    }
}
// Causal attention of n new queries q [hq, n, d] (query i at position start + i sees keys
// 0..start+i) over the cache: kb = K^T blocked [hkv][cap/64][d][64], vc [hkv, cap, d].
// out [n, hq * d] (the o-projection's input). s: scratch of G n ceil(L / 64) 64 floats.
// softmax(q.k * scale) with the row max subtracted; d in {16, 32, 64, 128}.
extern "C" void os_attn(const float* q, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                        const float* kb, const float* vc, int64_t cap, int64_t start,
                        float scale, float* out, float* s) {
    Ftz ftz;
    int64_t G = hq / hkv, L = start + n, R = G * n, NB = (L + 63) / 64, ld = NB * 64;
    int64_t orow[6];
    float inv[6];
    for (int64_t g = 0; g < hkv; ++g) {
        const float* Q = q + g * R * d;  // heads g G .. g G + G - 1: R rows of d
        const float* Kb = kb + g * (cap / 64) * d * 64;
        const float* V = vc + g * cap * d;
        for (int64_t nb = 0; nb < NB; ++nb) {  // s[r][t] = q_r . k_t for every t < L
            int64_t nc = L - nb * 64 < 64 ? L - nb * 64 : 64;
            const float* w = Kb + nb * d * 64;
            for (int64_t m = 0; m < R;) {
                const float* xm = Q + m * d; float* ym = s + m * ld + nb * 64;
                switch (R - m >= 6 ? 6 : R - m) {
                    case 6: block<6, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 6; break;
                    case 5: block<5, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 5; break;
                    case 4: block<4, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 4; break;
                    case 3: block<3, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 3; break;
                    case 2: block<2, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 2; break;
                    default: block<1, 4, false>(xm, d, w, ym, ld, nc, nullptr); m += 1; break;
                }
            }
        }
        for (int64_t r = 0; r < R; ++r) {  // p = exp(s scale - max) on t < start + i + 1, 0 after
            float* sr = s + r * ld;
            int64_t Li = start + r % n + 1;
            __m512 sc = _mm512_set1_ps(scale), mx = _mm512_set1_ps(-INFINITY);
            for (int64_t t = 0; t < Li; t += 16) {
                __mmask16 mk = Li - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Li - t)) - 1u);
                __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + t), sc);
                _mm512_mask_storeu_ps(sr + t, mk, x);
                mx = _mm512_mask_max_ps(mx, mk, mx, x);
            }
            __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            for (int64_t t = 0; t < ld; t += 16) {
                __mmask16 mk = t >= Li ? (__mmask16)0 : (Li - t >= 16 ? (__mmask16)0xFFFF
                                                          : (__mmask16)((1u << (Li - t)) - 1u));
                __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sr + t), m));
                _mm512_storeu_ps(sr + t, _mm512_maskz_mov_ps(mk, e));
            }
        }
        for (int64_t m = 0; m < R;) {  // out = p v / sum p
            int64_t mr = R - m >= 6 ? 6 : R - m;
            if (d > 64 && mr > 3) mr = 3;
            for (int64_t x = 0; x < mr; ++x) {
                int64_t r = m + x, h = g * G + r / n, i = r % n;
                orow[x] = i * hq * d + h * d;
                const float* sr = s + r * ld;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t t = 0; t < ld; t += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(sr + t));
                inv[x] = 1.0f / _mm512_reduce_add_ps(acc);
            }
            const float* pr = s + m * ld;
            int64_t Lm = L;
            if (d == 16) {
                switch (mr) { case 6: pv<6, 1>(pr, ld, V, d, Lm, inv, out, orow); break; case 5: pv<5, 1>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 4: pv<4, 1>(pr, ld, V, d, Lm, inv, out, orow); break; case 3: pv<3, 1>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 2: pv<2, 1>(pr, ld, V, d, Lm, inv, out, orow); break; default: pv<1, 1>(pr, ld, V, d, Lm, inv, out, orow); }
            } else if (d == 32) {
                switch (mr) { case 6: pv<6, 2>(pr, ld, V, d, Lm, inv, out, orow); break; case 5: pv<5, 2>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 4: pv<4, 2>(pr, ld, V, d, Lm, inv, out, orow); break; case 3: pv<3, 2>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 2: pv<2, 2>(pr, ld, V, d, Lm, inv, out, orow); break; default: pv<1, 2>(pr, ld, V, d, Lm, inv, out, orow); }
            } else if (d == 64) {
                switch (mr) { case 6: pv<6, 4>(pr, ld, V, d, Lm, inv, out, orow); break; case 5: pv<5, 4>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 4: pv<4, 4>(pr, ld, V, d, Lm, inv, out, orow); break; case 3: pv<3, 4>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 2: pv<2, 4>(pr, ld, V, d, Lm, inv, out, orow); break; default: pv<1, 4>(pr, ld, V, d, Lm, inv, out, orow); }
            } else {
                switch (mr) { case 3: pv<3, 8>(pr, ld, V, d, Lm, inv, out, orow); break;
                              case 2: pv<2, 8>(pr, ld, V, d, Lm, inv, out, orow); break; default: pv<1, 8>(pr, ld, V, d, Lm, inv, out, orow); }
            }
            m += mr;
        }
    }
}
// The per-round online loss KL(p || q) = sum_v p_v (t_v - d_v) - lse(t) + lse(d), p = softmax(t),
// q = softmax(d), per row of fp32 logits [m, V] (fp32 sums in 16 lanes). Columns where the draft's
// logit is +-inf (outside a reduced vocabulary, pad_vocab) are left out, as updaters.losses drops
// them; a NaN in a kept column gives NaN. g (or null): the gradient rows q - p [m, V].
extern "C" void os_kl_rows(const float* d, const float* t, int64_t m, int64_t V, float* out, float* g) {
    Ftz ftz;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < m; ++r) {
        const float* dr = d + r * V; const float* tr = t + r * V;
        __m512 md = ninf, mt = ninf, bad = _mm512_setzero_ps();
        for (int64_t v = 0; v < V; v += 16) {
            __mmask16 mk = V - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - v)) - 1u);
            __m512 a = _mm512_mask_loadu_ps(ninf, mk, dr + v), b = _mm512_mask_loadu_ps(ninf, mk, tr + v);
            // kept: the draft's logit is not +-inf (NaN is kept, and surfaces through bad)
            __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(INFINITY), _CMP_NEQ_UQ) & mk;
            bad = _mm512_add_ps(bad, _mm512_maskz_sub_ps(fin, a, a));  // NaN -> NaN
            bad = _mm512_add_ps(bad, _mm512_maskz_sub_ps(fin, b, b));  // target NaN / inf -> NaN
            md = _mm512_mask_max_ps(md, fin, md, a);
            mt = _mm512_mask_max_ps(mt, fin, mt, b);
        }
        float fmd = _mm512_reduce_max_ps(md), fmt = _mm512_reduce_max_ps(mt);
        float nb = _mm512_reduce_add_ps(bad);
        if (nb != nb || fmd == -INFINITY || fmt == -INFINITY) { out[r] = NAN; continue; }
        __m512 vmd = _mm512_set1_ps(fmd), vmt = _mm512_set1_ps(fmt);
        __m512 sd = _mm512_setzero_ps(), st = _mm512_setzero_ps(), dot = _mm512_setzero_ps();
        for (int64_t v = 0; v < V; v += 16) {
            __mmask16 mk = V - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - v)) - 1u);
            __m512 a = _mm512_mask_loadu_ps(ninf, mk, dr + v), b = _mm512_mask_loadu_ps(ninf, mk, tr + v);
            __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(INFINITY), _CMP_NEQ_UQ) & mk;
            __m512 ea = exp512(_mm512_sub_ps(a, vmd)), eb = exp512(_mm512_sub_ps(b, vmt));
            sd = _mm512_mask_add_ps(sd, fin, sd, ea);
            st = _mm512_mask_add_ps(st, fin, st, eb);
            dot = _mm512_mask_add_ps(dot, fin, dot, _mm512_mul_ps(eb, _mm512_sub_ps(b, a)));
        }
        float fsd = _mm512_reduce_add_ps(sd), fst = _mm512_reduce_add_ps(st), fdot = _mm512_reduce_add_ps(dot);
        out[r] = fdot / fst - (fmt + std::log(fst)) + (fmd + std::log(fsd));
        if (g) {  // d KL / d d_v = q_v - p_v on the kept columns, 0 on the dropped ones
            float* gr = g + r * V;
            __m512 isd = _mm512_set1_ps(1.0f / fsd), ist = _mm512_set1_ps(1.0f / fst);
            for (int64_t v = 0; v < V; v += 16) {
                __mmask16 mk = V - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - v)) - 1u);
                __m512 a = _mm512_mask_loadu_ps(ninf, mk, dr + v), b = _mm512_mask_loadu_ps(ninf, mk, tr + v);
                __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(INFINITY), _CMP_NEQ_UQ) & mk;
                __m512 q = _mm512_mul_ps(exp512(_mm512_sub_ps(a, vmd)), isd);
                __m512 pt = _mm512_mul_ps(exp512(_mm512_sub_ps(b, vmt)), ist);
                _mm512_mask_storeu_ps(gr + v, mk, _mm512_maskz_sub_ps(fin, q, pt));
            }
        }
    }
}
"""
# The lm draft's readout in int8 (AVX-512 VNNI vpdpbusd): W per row w = s_n q (q int8 in
# -127..127, s_n = max |w_n| / 127), x per call x = s_x (u - 128) (u uint8); y_n = s_x s_n
# (sum_k u_k q_nk - 128 sum_k q_nk). 1 MB for the demo draft's 8,192 x 128 lm_head, which then
# stays in L2 next to the rest of the draft: measured 15 us a row (56 after a 16 MB read) vs 76
# (124) in bf16. |error| ~1% of the logits' range: a draft's logits only choose its proposals.
# wp[ceil(N/64)][ceil(K/4)][64][4] int8; scale[N]; rowsum[N] = sum_k q_nk.
_I8_SRC = r"""
#include <cmath>
extern "C" void os_pack_i8(const float* w, int64_t N, int64_t K, int8_t* wp, float* scale,
                           int32_t* rowsum) {
    int64_t K4 = (K + 3) / 4, NB = (N + 63) / 64;
    for (int64_t n = 0; n < NB * 64; ++n) {
        const float* row = w + n * K;
        uint32_t* o = (uint32_t*)(wp + (n / 64) * K4 * 256) + n % 64;  // word (n, p) at o[p * 64]
        if (n >= N) {
            for (int64_t p = 0; p < K4; ++p) o[p * 64] = 0;
            continue;
        }
        // max |w| over the row; a NaN/inf weight: the row's outputs are NaN (it must surface)
        __m512 mxv = _mm512_setzero_ps();
        bool bad = false;
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, row + k));
            if (_mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4e38f), _CMP_NLE_UQ) & mk) bad = true;
            mxv = _mm512_max_ps(mxv, a);
        }
        float mx = bad ? 0.f : _mm512_reduce_max_ps(mxv);
        float s = mx > 0 ? mx / 127.f : 1.f, inv = 1.f / s;
        __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
        __m512i rs = _mm512_setzero_si512();
        for (int64_t k = 0; k < 4 * K4; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (K > k ? (__mmask16)((1u << (K - k)) - 1u) : (__mmask16)0);
            __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, row + k), vinv), lo), hi);
            __m512i q = _mm512_maskz_cvtps_epi32(mk, x);  // round to nearest even (MXCSR), as lrint
            rs = _mm512_add_epi32(rs, q);
            alignas(16) int8_t b[16];
            _mm_store_si128((__m128i*)b, _mm512_cvtepi32_epi8(q));
            const uint32_t* bw = (const uint32_t*)b;
            for (int64_t j = 0; j < 4 && k / 4 + j < K4; ++j) o[(k / 4 + j) * 64] = bw[j];
        }
        scale[n] = bad ? NAN : s;
        rowsum[n] = _mm512_reduce_add_epi32(rs);
    }
}
// y[M, N] row by row; xq: scratch of 4 ceil(K/4) bytes
extern "C" void os_gemm_i8(const float* x, int64_t M, int64_t K, const int8_t* wp, int64_t N,
                           const float* scale, const int32_t* rowsum, const float* bias, float* y,
                           uint8_t* xq) {
    int64_t K4 = (K + 3) / 4, NB = (N + 63) / 64;
    for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float* ym = y + m * N;
        float mx = 0.f;
        bool bad = false;  // a NaN/inf input: NaN out, as F.linear would give
        for (int64_t k = 0; k < K; ++k) {
            float a = std::fabs(xm[k]);
            if (!(a <= 3.4e38f)) bad = true; else mx = std::fmax(mx, a);
        }
        if (bad) {
            for (int64_t n = 0; n < N; ++n) ym[n] = NAN;
            continue;
        }
        float sx = mx > 0 ? mx / 127.f : 1.f, inv = 1.f / sx;
        for (int64_t k = 0; k < 4 * K4; ++k)
            xq[k] = (uint8_t)(k < K ? (int)std::lrint(xm[k] * inv) + 128 : 128);
        int32_t x32[1024];
        const int32_t* xw = (const int32_t*)xq;
        if (K4 <= 1024) for (int64_t p = 0; p < K4; ++p) x32[p] = xw[p];
        const int32_t* xv32 = K4 <= 1024 ? x32 : xw;
        for (int64_t nb = 0; nb < NB; ++nb) {
            const int8_t* w = wp + nb * K4 * 256;
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512()};
            for (int64_t p = 0; p < K4; ++p) {
                const int8_t* wk = w + p * 256;
                _mm_prefetch((const char*)(wk + 4096), _MM_HINT_T0);
                __m512i xv = _mm512_set1_epi32(xv32[p]);
                for (int j = 0; j < 4; ++j)
                    acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_loadu_si512((const void*)(wk + 64 * j)));
            }
            for (int j = 0; j < 4; ++j) {
                int64_t c0 = nb * 64 + j * 16;
                if (c0 >= N) break;
                int64_t nc = N - c0 < 16 ? N - c0 : 16;
                __mmask16 mk = (__mmask16)((1u << nc) - 1u);
                __m512i a = _mm512_sub_epi32(acc[j], _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, rowsum + c0), 7));
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a),
                                         _mm512_mul_ps(_mm512_set1_ps(sx), _mm512_maskz_loadu_ps(mk, scale + c0)));
                if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + c0));
                _mm512_mask_storeu_ps(ym + c0, mk, v);
            }
        }
    }
}
"""
# One drafted token through a whole Llama-family draft in one call (the draft library holds the
# fp32 kernels too): embedding row, then per layer the same kernels as LeanLM's forward (RMSNorm,
# q|k|v GEMM, RoPE + cache write, attention, o GEMM, gate|up GEMM, silu(g) u, down GEMM), the
# final norm, the int8 readout and the argmax. Python's per-op overhead was ~2/3 of a drafted
# token (~25 torch ops and kernel calls); the math is the lean forward's.
_STEP_SRC = r"""
#include <cmath>
#include <cstring>
// w: per layer {in_norm, qkv_wp, qkv_bias, o_wp, post_norm, gu_wp, down_wp} as addresses;
// c: per layer {k cache, v cache, blocked K^T}; the token goes to cache row pos.
// scratch: 4 H + (hq + 2 hkv) d + 2 hq d + 3 I + G ceil((pos + 1) / 64) 64 + H floats.
// Returns argmax(logits) (torch's rule: the first maximum, a NaN counts as the maximum).
extern "C" int64_t os_draft_step(int64_t tok, int64_t pos, const float* embed, int64_t H,
                                 int64_t nl, const int64_t* w, const int64_t* c, int64_t cap,
                                 int64_t hq, int64_t hkv, int64_t d, int64_t I, float eps,
                                 float scale, const float* cos, const float* sin,
                                 const float* fnorm, const int8_t* head, const float* hscale,
                                 const int32_t* hrowsum, const float* hbias, int64_t V,
                                 float* scratch, float* logits) {
    Ftz ftz;
    int64_t nqkv = (hq + 2 * hkv) * d, G = hq / hkv, NB = (pos + 1 + 63) / 64;
    float* x = scratch; float* h = x + H; float* t = h + H; float* qkv = t + H;
    float* qo = qkv + nqkv; float* att = qo + hq * d; float* gu = att + hq * d; float* a = gu + 2 * I;
    float* sc = a + I; uint8_t* xq = (uint8_t*)(sc + G * NB * 64);
    std::memcpy(x, embed + tok * H, H * sizeof(float));
    for (int64_t l = 0; l < nl; ++l) {
        const int64_t* wl = w + 7 * l;
        const int64_t* cl = c + 3 * l;
        os_rms_norm(x, (const float*)wl[0], h, 1, H, eps);
        os_gemm(h, 1, H, (const float*)wl[1], nqkv, (const float*)wl[2], qkv);
        os_rope_kv(qkv, nqkv, qkv + hq * d, nqkv, qkv + (hq + hkv) * d, nqkv, 1, hq, hkv, d, cos, sin,
                   qo, (float*)cl[0], (float*)cl[1], cap, pos, (float*)cl[2]);
        os_attn(qo, 1, hq, hkv, d, (const float*)cl[2], (const float*)cl[1], cap, pos, scale, att, sc);
        os_gemm(att, 1, hq * d, (const float*)wl[3], H, nullptr, t);
        for (int64_t i = 0; i < H; ++i) x[i] += t[i];
        os_rms_norm(x, (const float*)wl[4], h, 1, H, eps);
        os_gemm(h, 1, H, (const float*)wl[5], 2 * I, nullptr, gu);
        for (int64_t i = 0; i < I; ++i) { float g = gu[i]; a[i] = g / (1.0f + std::exp(-g)) * gu[I + i]; }
        os_gemm(a, 1, I, (const float*)wl[6], H, nullptr, t);
        for (int64_t i = 0; i < H; ++i) x[i] += t[i];
    }
    os_rms_norm(x, fnorm, h, 1, H, eps);
    os_gemm_i8(h, 1, H, head, V, hscale, hrowsum, hbias, logits, xq);
    int64_t best = 0;
    for (int64_t i = 0; i < V; ++i) {
        if (logits[i] != logits[i]) return i;
        if (logits[i] > logits[best]) best = i;
    }
    return best;
}
"""
def _kl_pass(d: torch.Tensor, t: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """os_kl_rows on fp32 CPU logits [m, V] (d the draft's, t the target's): per-row KL and, with
    grad, q - p [m, V] from the same pass; None when the kernels are not compiled or the
    tensors do not fit (the caller runs the torch form)."""
    ks = kernels()
    if (ks is None or d.dtype != torch.float32 or t.dtype != torch.float32 or d.device.type != "cpu"
            or d.shape != t.shape or d.dim() != 2):
        return None
    d, t = d.detach().contiguous(), t.detach().contiguous()
    out, g = torch.empty(d.shape[0]), (torch.empty_like(d) if grad else None)
    ks.kl(d.data_ptr(), t.data_ptr(), d.shape[0], d.shape[1], out.data_ptr(), None if g is None else g.data_ptr())
    return out, g


def kl_rows(d: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """KL(softmax(t) || softmax(d)) per row of fp32 CPU logits [m, V] (the per-round online loss
    every updater reports, frozen too: ~7 torch ops and ~0.18 ms a round in-run), or None."""
    got = _kl_pass(d, t, False)
    return None if got is None else got[0]


def kl_rows_and_grad(d: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kl_rows and its gradient in d, q - p [m, V], from one pass (no autograd), or None."""
    return _kl_pass(d, t, True)  # type: ignore[return-value]


class _KLRows(torch.autograd.Function):
    """KL(p || q) per row with its gradient q - p from the same pass (one kernel forward, one
    multiply backward: a torch fkl is two log-softmaxes, a kl_div and ~6 backward ops)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, g = _kl_pass(d, t, True)  # type: ignore[misc]  (kl_rows_grad checked it applies)
        ctx.save_for_backward(g)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return g * grad_out[:, None], None


def kl_rows_grad(d: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """kl_rows for a training step: d [m, V] fp32 CPU logits with grad, t the target's (no
    grad): per-row KL whose backward is (q - p) * grad; None when the kernels do not apply."""
    if (kernels() is None or d.dtype != torch.float32 or t.dtype != torch.float32 or d.device.type != "cpu"
            or d.shape != t.shape or d.dim() != 2 or t.requires_grad or d.shape[0] == 0):
        return None
    return _KLRows.apply(d, t)


_gemm_lib: list = []  # [ctypes function or None] once tried
_draft_lib: list = []  # [_DraftKernels or None] once tried
GEMM_MAX_ROWS = 16  # more rows (a prompt): MKL's GEMM, compute-bound there
DRAFT_MAX_ROWS = 64  # a draft's copies also take its catch-up reads (tokens it missed): tiny weights
ATTN_MAX_ROWS = 16  # more new tokens (a prompt): SDPA reads the same cache


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onlinespec" / "kernels"


class _Kernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        P, I = ctypes.c_void_p, ctypes.c_int64
        self.gemm = lib.os_gemm
        self.gemm.argtypes = [P, I, I, P, I, P, P]
        self.rms_norm = lib.os_rms_norm
        self.rms_norm.argtypes = [P, P, P, I, I, ctypes.c_float]
        self.rope_kv = lib.os_rope_kv
        self.rope_kv.argtypes = [P, I, P, I, P, I, I, I, I, I, P, P, P, P, P, I, I, P]
        self.attn = lib.os_attn
        self.attn.argtypes = [P, I, I, I, I, P, P, I, I, ctypes.c_float, P, P]
        self.kl = lib.os_kl_rows
        self.kl.argtypes = [P, P, I, I, P, P]
        for f in (self.gemm, self.rms_norm, self.rope_kv, self.attn, self.kl):
            f.restype = None

    def __deepcopy__(self, memo: dict) -> "_Kernels":  # one loaded library per process
        return self


def _compile(src: str, name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build src once with the system C++ compiler into the kernel cache (keyed by source,
    compiler and flags) and load it; raises when there is no compiler or the build fails."""
    if os.environ.get("ONLINESPEC_NO_KERNEL", "") not in ("", "0"):
        raise RuntimeError("disabled")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        raise RuntimeError("no AVX-512")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    # no FMA contraction: the elementwise kernels round each multiply and add as torch does
    flags = ["-O3", "-mavx512f", "-mfma", *extra_flags, "-ffp-contract=off", "-shared", "-fPIC"]
    tag = hashlib.sha1((src + cxx + " ".join(flags)).encode()).hexdigest()[:16]
    so = _cache_dir() / f"{name}-{tag}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            cpp, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
            cpp.write_text(src)
            subprocess.run([cxx, *flags, "-o", str(out), str(cpp)], check=True,
                           capture_output=True, timeout=120)
            os.replace(out, so)  # atomic: concurrent first uses each write their own
    return ctypes.CDLL(str(so))


def kernels() -> _Kernels | None:
    """The compiled CPU kernels (few-row GEMM, RMSNorm, RoPE + cache write), or None (env
    ONLINESPEC_NO_KERNEL=1, no AVX-512, no C++ compiler, or a failed self-check): callers then
    run the torch ops (MKL's x @ W^T for the GEMM)."""
    if _gemm_lib:
        return _gemm_lib[0]
    try:
        ks = _Kernels(_compile(_GEMM_SRC, "osgemm"))
        if not _self_check(ks):
            ks = None
    except Exception:  # noqa: BLE001 - any failure: the torch path, same results' quality
        ks = None
    _gemm_lib.append(ks)
    return ks


class _DraftKernels:
    """The draft-side kernels (AVX-512 VNNI): the int8 readout and the fused draft step."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        P, I = ctypes.c_void_p, ctypes.c_int64
        F32 = ctypes.c_float
        self.step = lib.os_draft_step
        self.step.argtypes = [I, I, P, I, I, P, P, I, I, I, I, I, F32, F32, P, P, P, P, P, P, P, I, P, P]
        self.step.restype = ctypes.c_int64
        self.pack_i8 = lib.os_pack_i8
        self.pack_i8.argtypes = [P, I, I, P, P, P]
        self.gemm_i8 = lib.os_gemm_i8
        self.gemm_i8.argtypes = [P, I, I, P, I, P, P, P, P, P]
        for f in (self.pack_i8, self.gemm_i8):
            f.restype = None

    def __deepcopy__(self, memo: dict) -> "_DraftKernels":  # one loaded library per process
        return self


def draft_kernels() -> _DraftKernels | None:
    """The int8 readout and fused step for drafts (a CPU with AVX-512 VNNI), or None: drafts then
    read out with F.linear on the live weight (the same proposals up to the int8 rounding)."""
    if _draft_lib:
        return _draft_lib[0]
    try:
        if not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported()):
            raise RuntimeError("no AVX-512 VNNI")
        ks = _DraftKernels(_compile(_GEMM_SRC + _I8_SRC + _STEP_SRC, "osdraft",
                                    ("-mavx512bw", "-mavx512vnni")))
        if not _draft_self_check(ks):
            ks = None
    except Exception:  # noqa: BLE001 - any failure: F.linear readout
        ks = None
    _draft_lib.append(ks)
    return ks


@dataclass
class Int8Weight:
    """W [N, K] as the int8 kernel's layout: q [ceil(N/64), ceil(K/4), 64, 4], per-row scale s
    (w = s q) and row sums of q."""
    q: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    n: int


def pack_i8(ks: _DraftKernels, w: torch.Tensor) -> Int8Weight:
    w = w.detach().float().contiguous()
    n, k = w.shape
    q = torch.empty((n + 63) // 64, (k + 3) // 4, 64, 4, dtype=torch.int8)
    scale, rowsum = torch.empty(n), torch.empty(n, dtype=torch.int32)
    ks.pack_i8(w.data_ptr(), n, k, q.data_ptr(), scale.data_ptr(), rowsum.data_ptr())
    return Int8Weight(q, scale, rowsum, n)


def _gemm_i8(ks: _DraftKernels, x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    y = x.new_empty(m, w.n)
    xq = torch.empty(4 * ((k + 3) // 4), dtype=torch.uint8)
    ks.gemm_i8(x.data_ptr(), m, k, w.q.data_ptr(), w.n, w.scale.data_ptr(), w.rowsum.data_ptr(),
               None if bias is None else bias.data_ptr(), y.data_ptr(), xq.data_ptr())
    return y


def i8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the int8 readout computes, in torch: the kernel's fp32 quantisation steps (s = max / 127,
    q = rint(w * (1 / s))), the integer dot exact in fp64, then the scales: for tests and the
    self-check."""
    def quant(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.float()
        mx = t.abs().amax(1, keepdim=True)
        sc = torch.where(mx > 0, mx / 127, torch.ones_like(mx))
        return torch.round(t * (1 / sc)).clamp(-127, 127), sc
    q, sw = quant(w)
    u, sx = quant(x)
    y = (u.double() @ q.double().t()) * (sx * sw.t()).double()
    return y if bias is None else y + bias.double()


def _draft_self_check(ks: _DraftKernels) -> bool:
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 16), (100, 33), (130, 128)):
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        w8 = pack_i8(ks, w)
        for m in (1, 5, 8):
            x = torch.randn(m, k, generator=g)
            if not torch.allclose(_gemm_i8(ks, x, w8, b).double(), i8_reference(x, w, b), rtol=1e-4, atol=1e-4):
                return False
    return True


def gemm_kernel() -> Callable | None:
    ks = kernels()
    return None if ks is None else ks.gemm


class _HugeArena:
    """Frozen weights on 2 MB pages: a bump allocator over anonymous mmaps advised
    MADV_HUGEPAGE (Linux THP in its default "madvise" mode). On 4 KB pages the demo target's
    68 MB take ~17k TLB entries, a page walk each per step, slow once anything else ran between
    two steps (the draft, in every round); on 2 MB pages, 34. Measured: the 33 GEMMs of a step,
    cold, 5-9% faster. A chunk lives while any tensor in it does; no mmap/madvise -> None."""
    CHUNK = 64 << 20
    PAGE = 2 << 20

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.off = self.size = 0

    def alloc(self, numel: int) -> torch.Tensor | None:
        nbytes = -(-numel * 4 // 64) * 64
        if self.buf is None or self.off + nbytes > self.size:
            if not hasattr(mmap, "MADV_HUGEPAGE"):
                return None
            size = max(self.CHUNK, -(-nbytes // self.PAGE) * self.PAGE) + self.PAGE
            try:
                mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                mm.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, ValueError, AttributeError):
                return None
            self.buf = torch.frombuffer(mm, dtype=torch.uint8)  # holds the mapping
            self.size = size
            self.off = (-self.buf.data_ptr()) % self.PAGE  # start on a 2 MB boundary
        t = self.buf[self.off:self.off + numel * 4].view(torch.float32)
        self.off += nbytes
        return t


_arena = _HugeArena()


def pack_blocked(w: torch.Tensor, huge: bool = False) -> torch.Tensor:
    """W [N, K] -> [ceil(N/64), K, 64] contiguous (the kernel's layout; zero-padded tail);
    huge: fp32 CPU storage on 2 MB pages where the OS allows (frozen weights)."""
    n, k = w.shape
    nb = (n + 63) // 64
    wp = w.new_zeros(nb * 64, k)
    wp[:n] = w
    blocked = wp.view(nb, 64, k).transpose(1, 2)
    out = _arena.alloc(blocked.numel()) if huge and w.dtype == torch.float32 and w.device.type == "cpu" else None
    if out is None:
        return blocked.contiguous()
    return out.view(nb, k, 64).copy_(blocked)


def _gemm(fn: Callable, x: torch.Tensor, wp: torch.Tensor, n: int,
          bias: torch.Tensor | None) -> torch.Tensor:
    y = x.new_empty(x.shape[0], n)
    fn(x.data_ptr(), x.shape[0], x.shape[1], wp.data_ptr(), n,
       None if bias is None else bias.data_ptr(), y.data_ptr())
    return y


def _self_check(ks: _Kernels) -> bool:
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 16), (100, 48), (7, 33)):
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        wp = pack_blocked(w)
        for m in (1, 5, 9):
            x = torch.randn(m, k, generator=g)
            ref = (x.double() @ w.double().t() + b.double()).float()
            if not torch.allclose(_gemm(ks.gemm, x, wp, n, b), ref, rtol=1e-4, atol=1e-4):
                return False
    x, w = torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    if not torch.allclose(_rms_norm_k(ks, x, w, 1e-5), ref, rtol=1e-5, atol=1e-6):
        return False
    n, hq, hkv, d = 3, 4, 2, 8
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    cos, sin = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    kc, vc = torch.zeros(hkv, 6, d), torch.zeros(hkv, 6, d)
    qo = _rope_kv_k(ks, qkv, hq, hkv, d, cos, sin, kc, vc, 2)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    if not (torch.equal(qo, rotate(q.reshape(n, hq, d).transpose(0, 1), cos, sin))
            and torch.equal(kc[:, 2:5], rotate(k.reshape(n, hkv, d).transpose(0, 1), cos, sin))
            and torch.equal(vc[:, 2:5], v.reshape(n, hkv, d).transpose(0, 1))):
        return False
    for hq, hkv, d, start, n in ((4, 2, 16, 70, 3), (2, 1, 64, 0, 5), (2, 2, 128, 5, 1)):
        kc, vc = torch.randn(hkv, 128, d, generator=g), torch.randn(hkv, 128, d, generator=g)
        kb = kc.view(hkv, 2, 64, d).transpose(2, 3).contiguous()
        q = torch.randn(hq, n, d, generator=g)
        L = start + n
        mask = torch.ones(n, L, dtype=torch.bool).tril(diagonal=start)
        ref = F.scaled_dot_product_attention(q[None], kc[None, :, :L], vc[None, :, :L], attn_mask=mask,
                                             scale=d ** -0.5, enable_gqa=True)[0].transpose(0, 1).reshape(n, -1)
        if not torch.allclose(_attn_k(ks, q, kb, vc, start, d ** -0.5), ref, rtol=1e-4, atol=1e-5):
            return False
    return True


def _rms_norm_k(ks: _Kernels, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    y = torch.empty_like(x)
    ks.rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def _rope_kv_k(ks: _Kernels, qkv: torch.Tensor, hq: int, hkv: int, d: int, cos: torch.Tensor,
               sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, start: int,
               k: torch.Tensor | None = None, v: torch.Tensor | None = None,
               kb: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [n, (hq + 2 hkv) d] (or q [n, hq d] with k, v [n, hkv d]), all row-contiguous ->
    rotated q [hq, n, d]; rotated k and v written to rows start.. of kc, vc [hkv, cap, d] (and
    k to kb, the blocked K^T [hkv, cap / 64, d, 64] the attention kernel reads, when given)."""
    n = qkv.shape[0]
    qo = qkv.new_empty(hq, n, d)
    es = qkv.element_size()
    if k is None:
        st = qkv.stride(0)
        qp = qkv.data_ptr()
        kp, kst, vp, vst = qp + hq * d * es, st, qp + (hq + hkv) * d * es, st
    else:
        st, qp = qkv.stride(0), qkv.data_ptr()
        kp, kst, vp, vst = k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0)
    ks.rope_kv(qp, st, kp, kst, vp, vst, n, hq, hkv, d, cos.data_ptr(), sin.data_ptr(),
               qo.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[1], start,
               None if kb is None else kb.data_ptr())
    return qo


def _attn_k(ks: _Kernels, q: torch.Tensor, kb: torch.Tensor, vc: torch.Tensor, start: int,
            scale: float) -> torch.Tensor:
    """Causal attention of q [hq, n, d] (positions start..) over rows < start + n of the cache
    (kb blocked K^T, vc [hkv, cap, d]) -> [n, hq d]."""
    hq, n, d = q.shape
    hkv, cap = vc.shape[0], vc.shape[1]
    L = start + n
    out = q.new_empty(n, hq * d)
    scratch = q.new_empty((hq // hkv) * n * ((L + 63) // 64) * 64)
    ks.attn(q.data_ptr(), n, hq, hkv, d, kb.data_ptr(), vc.data_ptr(), cap, start, scale,
            out.data_ptr(), scratch.data_ptr())
    return out


class PackedLinear:
    """y = x W^T + b for a frozen W, through whatever reads W fastest at this row count.

    fp32 on an AVX-512 CPU with torch on one thread, up to GEMM_MAX_ROWS rows: the few-row kernel
    above on W packed once in its blocked layout. Otherwise (grad, other dtypes, more threads,
    a prompt's many rows, no kernel) x @ W^T with W^T stored contiguous (built on first use
    there): F.linear hands MKL a transposed B that it repacks on every multi-row GEMM.
    Measured on the demo target, 1 thread, the whole forward's matmuls with cold weights
    (medians, README): 5 rows 6.7 ms with the kernel vs 8.9 with x @ W^T and 9.9 with F.linear,
    against 5.3-5.9 for one row with either (a plain read of the weights: ~6)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.detach()
        self.n = weight.shape[0]
        self.bias = None if bias is None else bias.detach().contiguous()
        self._wt: torch.Tensor | None = None
        ok = weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
        self.kernel = gemm_kernel() if ok else None
        self.wp = pack_blocked(self.weight, huge=True) if self.kernel is not None else None
        if self.kernel is None:
            self._wt = self.weight.t().contiguous()

    @property
    def wt(self) -> torch.Tensor:
        """W^T [in, out] contiguous."""
        if self._wt is None:
            self._wt = self.weight.t().contiguous()
        return self._wt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not x.requires_grad and x.dtype == torch.float32:
            rows = x.numel() // x.shape[-1]
            if rows <= GEMM_MAX_ROWS and torch.get_num_threads() == 1:
                x2 = x.reshape(rows, x.shape[-1])
                if not x2.is_contiguous():
                    x2 = x2.contiguous()
                return _gemm(self.kernel, x2, self.wp, self.n, self.bias).view(*x.shape[:-1], self.n)
        y = x @ self.wt
        return y if self.bias is None else y + self.bias


class LiveLinear:
    """F.linear on a trainable nn.Linear's current weight (no module-call overhead)."""

    def __init__(self, mod: nn.Linear) -> None:
        self.mod = mod

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.mod.weight, self.mod.bias)


class _Mirrors:
    """The packed copies a trainable draft proposes with, and when they may be used: `on` only
    inside a no-grad LeanLM.forward that has just checked every weight's (storage, version)."""

    def __init__(self) -> None:
        self.on = False
        self.key: tuple | None = None


class DraftLinear:
    """A trainable draft's linear(s), q|k|v or gate|up fused: y = x [W_1; W_2; ...]^T (+ b).
    With a gradient wanted: F.linear on the live weights (concatenated; autograd flows into each).
    At proposal time: the fp32 few-row kernel on a packed copy, re-packed by LeanLM.sync_mirrors
    whenever a weight changed, so an update is seen by the next propose. Saves the per-call
    overhead of F.linear on the demo draft's tiny matrices (7 calls a drafted token)."""

    def __init__(self, mods: list[nn.Linear], mirrors: _Mirrors) -> None:
        self.mods, self.mirrors = mods, mirrors
        self.ks = kernels()
        self.wp: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.n = sum(m.weight.shape[0] for m in mods)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        ws, bs = [m.weight for m in self.mods], [m.bias for m in self.mods]
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        if all(b is None for b in bs):
            return w, None
        return w, torch.cat([b if b is not None else m.weight.new_zeros(m.weight.shape[0])
                             for b, m in zip(bs, self.mods)])

    def pack(self) -> None:
        if self.ks is None:
            return
        w, b = self.weights()
        self.wp = pack_blocked(w.detach().float())
        self.bias = None if b is None else b.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mirrors.on and self.wp is not None and x.shape[0] <= DRAFT_MAX_ROWS and x.dim() == 2:
            return _gemm(self.ks.gemm, x.contiguous(), self.wp, self.n, self.bias)
        w, b = self.weights()
        return F.linear(x, w, b)


class DraftReadout(LiveLinear):
    """A trainable draft's lm_head: F.linear on the live weight when a gradient is wanted; at
    proposal time the int8 kernel (AVX-512 VNNI) on a copy quantised from the live weight (re-made
    with the other copies when it changed). Measured on the demo draft (8,192 x 128, 1 thread):
    15 us a row with the copy in L2, 56 us after a 16 MB read evicted it; bf16 (the previous form)
    76 / 124 us (measured, then dropped), F.linear 178 / 200 us. A draft's logits only steer which tokens it proposes: the
    target still checks every one with its own fp32 logits, so the output is unchanged."""

    def __init__(self, mod: nn.Linear, mirrors: _Mirrors) -> None:
        super().__init__(mod)
        self.mirrors = mirrors
        self.ks = draft_kernels()
        self.wp: Int8Weight | None = None
        self.bias: torch.Tensor | None = None

    def pack(self) -> None:
        if self.ks is None:
            return
        self.wp = pack_i8(self.ks, self.mod.weight)
        b = self.mod.bias
        self.bias = None if b is None else b.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mirrors.on and self.wp is not None and x.shape[0] <= DRAFT_MAX_ROWS and x.dim() == 2:
            return _gemm_i8(self.ks, x.contiguous(), self.wp, self.bias)
        return F.linear(x, self.mod.weight, self.mod.bias)


class KVCache:
    """Per-layer K/V buffers [H_kv, cap, D]; length = positions held. crop is O(1).

    Same surface as HF's cache where the engine touches it: get_seq_length(), crop(n) with a
    negative n = tokens to drop (positive n = length to keep)."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256) -> None:
        self.length = 0
        self.k = [torch.empty(n_kv, capacity, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        # the attention kernel's copy of K, transposed in 64-key blocks [H_kv, cap/64, D, 64];
        # made by the first kernel-path forward of a fresh cache, kept while every write is one
        self.kb: list[torch.Tensor] | None = None
        self.kb_ok = True

    def blocked(self) -> list[torch.Tensor] | None:
        """The blocked K^T buffers, or None once a row was written without them."""
        if self.kb is None:
            if self.length > 0 or not self.kb_ok:
                self.kb_ok = False
                return None
            cap = -(-self.capacity // 64) * 64
            if cap != self.capacity:  # nothing held yet: re-make at a multiple of 64
                self.k = [t.new_empty(t.shape[0], cap, t.shape[2]) for t in self.k]
                self.v = [torch.empty_like(t) for t in self.k]
            self.kb = [t.new_empty(t.shape[0], cap // 64, t.shape[2], 64) for t in self.k]
        return self.kb if self.kb_ok else None

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        keep = self.length + n if n < 0 else n
        self.length = max(0, min(self.length, keep))

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity)
        if self.kb is not None:
            cap = -(-cap // 64) * 64
            for i, t in enumerate(self.kb):
                new = t.new_empty(t.shape[0], cap // 64, t.shape[2], 64)
                new[:, : t.shape[1]] = t
                self.kb[i] = new
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                new = t.new_empty(t.shape[0], cap, t.shape[2])
                new[:, : self.length] = t[:, : self.length]
                buf[i] = new

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [H_kv, n, D] at positions length..length+n-1 -> views of all held keys/values."""
        self.kb_ok = False  # (the kernel path writes through _rope_kv_k, this one skips kb)
        end = self.length + k.shape[1]
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # HF Llama/Qwen2: w * (x / sqrt(mean(x^2) + eps)) in fp32, cast back before the weight
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)  # one fused op, same math
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, HF's rotate_half convention: x*cos + [-x2, x1]*sin; x [H, n, D], cos/sin [n, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass
class _Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: list  # fused: [PackedLinear]; live: [q, k, v] nn.Linear modules
    o: object
    gate_up: list  # fused: [PackedLinear]; live: [gate, up]
    down: object


def lean_supported(model: PreTrainedModel) -> bool:
    c = model.config
    if c.model_type not in LEAN_TYPES or not hasattr(model, "model"):
        return False
    window = getattr(c, "sliding_window", None)
    if c.model_type == "qwen2":
        window = window if getattr(c, "use_sliding_window", False) else None
    if window is not None and window < c.max_position_embeddings:
        return False  # sliding-window layers: HF's forward (with a full cache) handles the mask
    return all(hasattr(lay, "self_attn") and hasattr(lay, "mlp") and
               not hasattr(lay.self_attn, "q_norm") for lay in model.model.layers)


class LeanLM:
    """Plain-torch forward of a Llama/Qwen2/Mistral causal LM, reading the HF module's weights.

    frozen=True (a target): q|k|v and gate|up fused and MKL-packed once (the weights never
    change). frozen=False (a draft being trained online): a forward with grad reads the live
    nn.Linear modules; a proposal reads packed copies (DraftLinear, fp32; DraftReadout, int8
    lm_head) that re-pack when a weight's version changed, so an optimizer step is seen by the
    next propose."""

    def __init__(self, model: PreTrainedModel, frozen: bool) -> None:
        c = model.config
        self.model, self.frozen = model, frozen
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.n_heads
        self.eps = c.rms_norm_eps
        self.act = ACT2FN[c.hidden_act]
        self.rotary = model.model.rotary_emb
        # static RoPE kinds: cos/sin depend on the position only -> one table, indexed per call
        self.rope_table = getattr(self.rotary, "rope_type", "default") in ("default", "linear", "llama3", "yarn")
        self._cos = self._sin = None
        self.scale = self.head_dim ** -0.5
        self.mirrors = _Mirrors()  # frozen=False: the packed copies proposals read
        self._params: list[torch.Tensor] | None = None
        self._step_w: torch.Tensor | bool | None = None  # fused draft step's table (False: n/a)
        self.layers = [self._layer(lay) for lay in model.model.layers]
        head = model.get_output_embeddings()
        self.lm_head = PackedLinear(head.weight, head.bias) if frozen else DraftReadout(head, self.mirrors)
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.tied = self.embed.weight is head.weight
        self.embed_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see _layers

    def _layer(self, lay: nn.Module) -> _Layer:
        a, m = lay.self_attn, lay.mlp
        if not self.frozen:
            return _Layer(lay.input_layernorm.weight, lay.post_attention_layernorm.weight,
                          [DraftLinear([a.q_proj, a.k_proj, a.v_proj], self.mirrors)],
                          DraftLinear([a.o_proj], self.mirrors),
                          [DraftLinear([m.gate_proj, m.up_proj], self.mirrors)],
                          DraftLinear([m.down_proj], self.mirrors))

        def cat(mods: list[nn.Linear]) -> PackedLinear:
            w = torch.cat([x.weight.detach() for x in mods])
            bs = [x.bias for x in mods]
            b = None if all(v is None for v in bs) else torch.cat(
                [v.detach() if v is not None else x.weight.new_zeros(x.weight.shape[0]) for v, x in zip(bs, mods)])
            return PackedLinear(w, b)
        return _Layer(lay.input_layernorm.weight.detach(), lay.post_attention_layernorm.weight.detach(),
                      [cat([a.q_proj, a.k_proj, a.v_proj])], PackedLinear(a.o_proj.weight, a.o_proj.bias),
                      [cat([m.gate_proj, m.up_proj])], PackedLinear(m.down_proj.weight, m.down_proj.bias))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def rope(self, x: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, D] for positions start..start+n-1 (HF's rotary module computes them)."""
        if not self.rope_table:
            pos = torch.arange(start, start + n, device=x.device)[None]
            cos, sin = self.rotary(x[None], pos)
            return cos[0], sin[0]
        if self._cos is None or self._cos.shape[0] < start + n:
            cap = max(512, 2 * (start + n))
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self.rotary(x[None].detach(), torch.arange(cap, device=x.device)[None])
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[start:start + n], self._sin[start:start + n]

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(len(self.layers), self.n_kv, self.head_dim, self.embed.weight.dtype,
                       self.device, capacity)

    def _qkv(self, lay: _Layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq, hkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if len(lay.qkv) == 1:
            q, k, v = lay.qkv[0](h).split([hq, hkv, hkv], dim=-1)
            return q, k, v
        return lay.qkv[0](h), lay.qkv[1](h), lay.qkv[2](h)

    def _mlp(self, lay: _Layer, h: torch.Tensor) -> torch.Tensor:
        if len(lay.gate_up) == 1:
            g, u = lay.gate_up[0](h).chunk(2, dim=-1)
        else:
            g, u = lay.gate_up[0](h), lay.gate_up[1](h)
        return lay.down(self.act(g) * u)

    def _layers(self, ids: torch.Tensor, start: int, kv: Callable, pos: int | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """The decoder stack over ids [n] at positions start..; kv(layer, k, v) -> every key and
        value the new queries attend to ([H_kv, start+n, D]). Returns the final-norm states.
        cache (kv is its write, no grad, fp32, kernels compiled): RMSNorm and RoPE + the cache
        write run as one compiled call each (the same math; ~10 torch ops fewer per layer)."""
        n = ids.numel()
        # training form with tied embeddings: a sparse embedding grad (a few rows) joins the
        # lm_head's dense one, instead of a dense [V, H] zero tensor + add per step
        if self.embed_rows is not None and torch.is_grad_enabled():
            # the step collects the input side's gradient itself (rows of d x), to add it in place
            # into the head's dense gradient of the same tied matrix (autograd would add a sparse
            # to a dense [V, H] out of place: a fresh 4 MB tensor and a copy, ~1.5-2.5 ms a step)
            x = F.embedding(ids, self.embed.weight.detach(), self.embed.padding_idx).requires_grad_()
            self.embed_rows.append((ids, x))
        else:
            x = F.embedding(ids, self.embed.weight, self.embed.padding_idx,
                            sparse=self.tied and not self.frozen and torch.is_grad_enabled())
        cos, sin = self.rope(x, start if pos is None else pos, n)  # pos: position of ids[0]
        # query i (position start+i) sees keys 0..start+i
        mask = None if n == 1 else torch.ones(n, start + n, dtype=torch.bool,
                                               device=ids.device).tril(diagonal=start)
        ks_ = kernels() if (cache is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                            and not torch.is_grad_enabled()) else None
        if ks_ is not None:
            cos, sin = cos.contiguous(), sin.contiguous()
            norm = lambda t, w: _rms_norm_k(ks_, t, w, self.eps)  # noqa: E731
        else:
            norm = lambda t, w: rms_norm(t, w, self.eps)  # noqa: E731
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        kb = (cache.blocked() if ks_ is not None and d in (16, 32, 64, 128) and hq % hkv == 0
              else None)
        for li, lay in enumerate(self.layers):
            h = norm(x, lay.in_norm)
            if ks_ is not None:
                kbl = None if kb is None else kb[li]
                if len(lay.qkv) == 1:
                    q = _rope_kv_k(ks_, lay.qkv[0](h), hq, hkv, d, cos, sin, cache.k[li], cache.v[li],
                                   start, kb=kbl)
                else:
                    q, k, v = (f(h).contiguous() for f in lay.qkv)
                    q = _rope_kv_k(ks_, q, hq, hkv, d, cos, sin, cache.k[li], cache.v[li], start, k, v, kbl)
                if kbl is not None and n <= ATTN_MAX_ROWS:
                    x = x + lay.o(_attn_k(ks_, q, kbl, cache.v[li], start, self.scale))
                    x = x + self._mlp(lay, norm(x, lay.post_norm))
                    continue
                ks, vs = cache.k[li][:, :start + n], cache.v[li][:, :start + n]
            else:
                q, k, v = self._qkv(lay, h)
                q = rotate(q.view(n, hq, d).transpose(0, 1), cos, sin)
                k = rotate(k.view(n, hkv, d).transpose(0, 1), cos, sin)
                ks, vs = kv(li, k, v.view(n, hkv, d).transpose(0, 1))
            att = F.scaled_dot_product_attention(q[None], ks[None], vs[None], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=hkv != hq)
            x = x + lay.o(att[0].transpose(0, 1).reshape(n, -1))
            x = x + self._mlp(lay, norm(x, lay.post_norm))
        return norm(x, self.norm.weight)

    def forward(self, ids: torch.Tensor, cache: KVCache, keep: int = 1, need_hidden: bool = False,
                pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [n] at positions cache.length.. (or pos.. for a cache that holds a context tail from
        position pos - length) -> (logits [keep, V] of the last keep positions, final-norm hidden
        states [n, H] when need_hidden). Appends n positions to the cache."""
        n, start = ids.numel(), cache.length
        cache.reserve(start + n)
        mirrored = not torch.is_grad_enabled() and self.sync_mirrors()
        self.mirrors.on = mirrored
        try:
            hidden = self._layers(ids, start, cache.write, pos, cache=cache)
            cache.length = start + n
            return self.lm_head(hidden[-keep:]), (hidden if need_hidden else None)
        finally:
            self.mirrors.on = False

    def forget_mirrors(self) -> None:
        """Re-read the parameter list at the next proposal (the draft's reset calls it: a load may
        have replaced parameters, not only written them); the copies re-pack only if the
        parameters' storage or versions then differ."""
        self._params = None

    def sync_mirrors(self) -> bool:
        """frozen=False: re-pack the proposal copies if any weight's storage or version moved
        (every optimizer step and load bumps the version). False: no kernel (F.linear then)."""
        if (self.frozen or self.embed.weight.dtype != torch.float32 or self.embed.weight.device.type != "cpu"
                or torch.get_num_threads() != 1 or kernels() is None):
            return False
        if self._params is None:
            self._params = list(self.model.parameters())  # (a module walk: once, not per token)
        key = tuple((p.data_ptr(), p._version) for p in self._params)
        if key != self.mirrors.key:
            for lay in self.layers:
                for f in (*lay.qkv, lay.o, *lay.gate_up, lay.down):
                    f.pack()
            self.lm_head.pack()
            self.mirrors.key = key
            self._step_w = None  # the fused step's weight table: rebuilt from the new copies
        return True

    def _step_table(self) -> torch.Tensor | None:
        """Addresses of the packed copies, per layer, for the fused draft step (None: this draft
        has a shape or part the step does not take: biases on o/down, no int8 readout, ...)."""
        ks = draft_kernels()
        c = self.model.config
        if (ks is None or self.frozen or getattr(c, "hidden_act", None) != "silu" or not self.rope_table
                or self.head_dim not in (16, 32, 64, 128) or self.n_heads % self.n_kv
                or self.lm_head.wp is None or not self.embed.weight.is_contiguous()):
            return None
        rows = []
        for lay in self.layers:
            if len(lay.qkv) != 1 or len(lay.gate_up) != 1 or lay.o.bias is not None or lay.down.bias is not None:
                return None
            fs = (lay.qkv[0], lay.o, lay.gate_up[0], lay.down)
            if any(f.wp is None for f in fs) or not (lay.in_norm.is_contiguous() and lay.post_norm.is_contiguous()):
                return None
            b = lay.qkv[0].bias
            rows += [lay.in_norm.data_ptr(), fs[0].wp.data_ptr(), 0 if b is None else b.data_ptr(),
                     fs[1].wp.data_ptr(), lay.post_norm.data_ptr(), fs[2].wp.data_ptr(), fs[3].wp.data_ptr()]
        return torch.tensor(rows, dtype=torch.int64)

    def draft_step(self, tok: int, cache: KVCache) -> torch.Tensor | None:
        """frozen=False, no grad, proposal copies current (after sync_mirrors): one token at
        position cache.length through the fused C step -> fp32 logits [V] (the cache grows by
        one). None when the step does not apply here (the caller runs forward instead)."""
        got = self.draft_steps([tok], cache, 1)
        return None if got is None else got[1][0]

    def draft_steps(self, toks: list[int], cache: KVCache, k: int) -> tuple[list[int], torch.Tensor] | None:
        """Greedy proposal through the fused C step, its per-call work done once: feed toks (the
        tokens the draft has not read yet; the last one's logits give the first drafted token),
        then k - 1 more steps on its own argmax (the C step returns it: the first maximum, or
        the first NaN, as torch.argmax). -> (k drafted tokens, fp32 logits [k, V]); the cache
        grows by len(toks) + k - 1. The same calls as draft_step token by token (one reserve,
        one pointer table, one scratch): ~0.1 ms of Python a drafted token less. None when the
        fused step does not apply (the caller drafts token by token)."""
        if self._step_w is None:
            self._step_w = self._step_table()
            if self._step_w is None:
                self._step_w = False
        if self._step_w is False or not toks or k < 1:
            return None
        start, n = cache.length, len(toks) + k - 1
        cache.reserve(start + n)
        kb = cache.blocked()
        if kb is None:
            return None
        cos, sin = self.rope(self.embed.weight, start, n)
        cos, sin = cos.contiguous(), sin.contiguous()
        ctab = torch.tensor([p for li in range(len(self.layers))
                             for p in (cache.k[li].data_ptr(), cache.v[li].data_ptr(), kb[li].data_ptr())],
                            dtype=torch.int64)
        H, I = self.embed.weight.shape[1], self.layers[0].down.mods[0].weight.shape[1]
        G, nb = self.n_heads // self.n_kv, (start + n + 63) // 64
        qkv = (self.n_heads + 2 * self.n_kv) * self.head_dim
        scratch = torch.empty(4 * H + qkv + 2 * self.n_heads * self.head_dim + 3 * I + G * nb * 64 + H + 16)
        head = self.lm_head
        V = head.mod.weight.shape[0]
        out = torch.empty(k, V)
        junk = torch.empty(V) if len(toks) > 1 else None
        ks, w8 = head.ks, head.wp
        args = (self.embed.weight.data_ptr(), H, len(self.layers), self._step_w.data_ptr(), ctab.data_ptr(),
                cache.capacity, self.n_heads, self.n_kv, self.head_dim, I, self.eps, self.scale)
        tail = (self.norm.weight.data_ptr(), w8.q.data_ptr(), w8.scale.data_ptr(), w8.rowsum.data_ptr(),
                None if head.bias is None else head.bias.data_ptr(), V, scratch.data_ptr())
        row_bytes = cos.stride(0) * cos.element_size()
        c0, s0 = cos.data_ptr(), sin.data_ptr()
        drafted: list[int] = []
        m = len(toks)
        for i in range(n):
            tok = toks[i] if i < m else drafted[-1]
            row = out[i - m + 1] if i >= m - 1 else junk
            best = ks.step(int(tok), start + i, *args, c0 + i * row_bytes, s0 + i * row_bytes, *tail,
                           row.data_ptr())
            cache.length = start + i + 1
            if i >= m - 1:
                drafted.append(int(best))
        return drafted, out

    def forward_after(self, ids: torch.Tensor, cache: KVCache, start: int,
                      pos: int | None = None) -> torch.Tensor:
        """Training form (grad on): logits [n, V] of ids [n] after the cache's first `start` rows
        (at positions start.., or pos..), attending to those rows' keys/values as constants (no
        gradient flows into the context; its K/V were computed with these same weights)."""
        return self.lm_head(self.hidden_after(ids, cache, start, pos))

    def hidden_after(self, ids: torch.Tensor, cache: KVCache, start: int,
                     pos: int | None = None) -> torch.Tensor:
        """forward_after's final-norm states [n, H], before the lm_head."""
        def kv(li: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # clone: the cache was written under inference_mode
            return (torch.cat([cache.k[li][:, :start].clone(), k], dim=1),
                    torch.cat([cache.v[li][:, :start].clone(), v], dim=1))
        return self._layers(ids, start, kv, pos)

    def weights_version(self) -> int:
        """Changes whenever any weight is written in place (optimizer steps, load_state)."""
        return sum(p._version for p in self.model.parameters())


def pack_linears(model: nn.Module) -> int:
    """Generic fast path for any frozen HF model: every nn.Linear / Conv1D forward runs through a
    PackedLinear (tied lm_head included: it packs the shared weight). Returns how many."""
    from transformers.pytorch_utils import Conv1D
    n = 0
    for mod in model.modules():
        if getattr(mod, ATTR + "_packed", False):
            continue
        if isinstance(mod, nn.Linear):
            lin = PackedLinear(mod.weight, mod.bias)
        elif isinstance(mod, Conv1D):  # GPT-2: y = x W + b with W [in, out]
            lin = PackedLinear(mod.weight.t(), mod.bias)
        else:
            continue
        mod.forward = lin.__call__  # instance attribute: nn.Module.__call__ finds it first
        setattr(mod, ATTR + "_packed", True)
        n += 1
    return n


def unpack_linears(model: nn.Module) -> None:
    for mod in model.modules():
        if getattr(mod, ATTR + "_packed", False):
            del mod.forward
            delattr(mod, ATTR + "_packed")


def full_cache() -> DynamicCache:
    """An HF cache with full-attention layers only, so crop can roll back any count of tokens
    (sliding-window layers cannot once the window is full; the model still masks the window)."""
    return DynamicCache()


def enable(model: PreTrainedModel, frozen: bool) -> LeanLM | None:
    """Attach the fast path to model; returns the LeanLM where the family has one."""
    disable(model)
    if not fast_supported(model):
        return None
    lean = LeanLM(model, frozen) if lean_supported(model) else None
    if lean is None and frozen:
        pack_linears(model)
    setattr(model, ATTR, lean if lean is not None else True)
    return lean


def disable(model: PreTrainedModel) -> None:
    if getattr(model, ATTR, None) is not None:
        unpack_linears(model)
        delattr(model, ATTR)


def is_fast(model: PreTrainedModel) -> bool:
    return getattr(model, ATTR, None) is not None


def lean_of(model: PreTrainedModel) -> LeanLM | None:
    lean = getattr(model, ATTR, None)
    return lean if isinstance(lean, LeanLM) else None
