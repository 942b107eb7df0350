"""The compiled kernels against the gguf package's dequantization times an fp32 matmul."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T, quants as gq

from llamalite.runtime.quantized import QuantLinear
from llamalite.kernels.ops import KERNEL_TYPES, kernels_available, simd_path, simd_paths
from tests.helpers import random_blocks

pytestmark = pytest.mark.skipif(not kernels_available(), reason="llamalite.kernels._cpu is not built")

# (M, N, K), odd on purpose: K of 1, 2, 3, 7 (a quad of blocks, a pair, one), 8, 9, 15 (8 + 4 + 2 + 1),
# 18 (8 + 8 + 2) and 128 blocks; M past the GEMM's 6 rows a pass, N past its 32 rows a tile
SHAPES = [(1, 1, 32), (3, 17, 64), (8, 33, 96), (3, 19, 224), (1, 5, 256), (2, 23, 480), (2, 576, 576),
          (5, 250, 4096), (9, 17, 64), (13, 70, 288), (40, 250, 576)]


def _k(type_name, k):
    """k, or for the K-quants the whole super-blocks of 256 that hold it."""
    return -(-k // 256) * 256 if type_name.endswith("_K") else k


def _weights(type_name, n, k, seed=0):
    """(GGUF rows, the same repacked for the kernels, the gguf package's dequantization). The gguf
    package cannot quantize to the K-quants: their blocks are random bytes, d (and Q4_K's dmin) set so
    that weights are about the size of the other types' (up to 63 * 15 steps of d for Q4_K, 128 * 32
    for Q6_K)."""
    if type_name.endswith("_K"):
        raw = random_blocks(type_name, n * k // 256, seed)
        rng = np.random.default_rng(seed)
        if type_name == "Q4_K":
            raw[:, 0:4] = rng.uniform(0, 1e-4, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
        else:
            raw[:, 208:210] = rng.uniform(0, 2e-5, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(n, -1)
    else:
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
        raw = gq.quantize(w, T[type_name])
    packed = torch.ops.llamalite.repack(torch.from_numpy(raw), KERNEL_TYPES[type_name])
    return torch.from_numpy(raw), packed, torch.from_numpy(gq.dequantize(raw, T[type_name]).astype(np.float32))


PATHS = dict(simd_paths()) if kernels_available() else {}


def test_the_best_path_is_chosen():
    assert simd_path() == next(iter(PATHS))
    assert "portable" in PATHS


@pytest.mark.parametrize("path", ["avx512vnni", "avx512vnni-gemm", "avx2", "portable"])
@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_qmatmul_matches_dequantized_fp32(path, type_name, m, n, k):
    if path not in PATHS:
        pytest.skip(f"this CPU has no {path}")
    k = _k(type_name, k)
    _, packed, w = _weights(type_name, n, k)
    x = torch.randn(m, k)
    got = torch.ops.llamalite.qmatmul_path(x, packed, KERNEL_TYPES[type_name], PATHS[path])
    want = x.double() @ w.double().T
    # int16 activations: each block's error is at most half a step of its scale, amax / 32767
    bound = (x.abs().amax() / 32767 * w.abs().sum(1).max()).item()
    assert (got.double() - want).abs().max().item() <= bound + 1e-5
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
def test_dequantize_op_is_exact(type_name):
    _, packed, w = _weights(type_name, 37, _k(type_name, 160))
    torch.testing.assert_close(torch.ops.llamalite.dequantize(packed, KERNEL_TYPES[type_name]), w, rtol=0, atol=0)


@pytest.mark.parametrize("gemm", ["int16", "fp32"])
@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
def test_quant_linear_prefill_paths(type_name, gemm, monkeypatch):
    """More rows than the dot-product kernel takes: the int16 GEMM (AVX-512 VNNI) or fp32 GEMM on
    dequantized weights (exact), whichever this CPU has; forced to fp32 here as on a CPU without VNNI.
    Without VNNI, Q6_K's rows run on the dot products, eight a pass, not on fp32 tiles."""
    import llamalite.runtime.quantized as q

    if gemm == "int16" and "avx512vnni-gemm" not in PATHS:
        pytest.skip("this CPU has no avx512vnni")
    monkeypatch.setattr(q, "QGEMM", gemm == "int16")
    k = _k(type_name, 128)
    raw, _, w = _weights(type_name, 40, k)
    layer = QuantLinear(raw, type_name, k)
    assert layer.packed
    x = torch.randn(2, 9, k)  # 18 rows
    if gemm == "fp32" and type_name not in q.DOT_ONLY_TYPES:
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=0, atol=0)
    else:
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-3, atol=1e-4)
    small = torch.randn(1, 3, k)  # 3 rows: the fused kernel
    torch.testing.assert_close(layer(small), F.linear(small, w), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
def test_gemm_rows_do_not_depend_on_the_batch(type_name):
    """A row's product is the same bits alone in a pass, in a short batch, in a long one, at any offset,
    and beside other weights in one call (the prefill of one request does not depend on its chunking)."""
    if "avx512vnni-gemm" not in PATHS:
        pytest.skip("this CPU has no avx512vnni")
    path, t = PATHS["avx512vnni-gemm"], KERNEL_TYPES[type_name]
    k = _k(type_name, 288)
    parts = [_weights(type_name, n, k, seed=n)[1] for n in (45, 7)]
    x = torch.randn(40, k)
    full = torch.ops.llamalite.qmatmul_path(x, parts[0], t, path)
    for lo, hi in [(0, 1), (3, 12), (11, 24), (20, 40)]:
        assert torch.equal(torch.ops.llamalite.qmatmul_path(x[lo:hi], parts[0], t, path), full[lo:hi])
    joint = torch.ops.llamalite.qmatmul_multi(x, parts, t)  # 40 rows: the GEMM
    assert torch.equal(joint[:, :45], full)
    assert torch.equal(joint[:, 45:], torch.ops.llamalite.qmatmul_path(x, parts[1], t, path))



@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
def test_dot_product_paths_agree_bit_for_bit(type_name):
    """The AVX2 and AVX-512 dot products make the same exact block sums and scale them in the same
    order: the same bits, in batches of one to eight rows and alone (decode on any x86 CPU)."""
    if "avx512vnni" not in PATHS or "avx2" not in PATHS:
        pytest.skip("this CPU lacks avx2 or avx512vnni")
    t = KERNEL_TYPES[type_name]
    for k in sorted({_k(type_name, k) for k in (224, 480, 576, 4096)}):  # 7, 15, 18 and 128 blocks
        _, packed, _ = _weights(type_name, 37, k, seed=k)
        x = torch.randn(8, k)
        vnni = torch.ops.llamalite.qmatmul_path(x, packed, t, PATHS["avx512vnni"])
        assert torch.equal(vnni, torch.ops.llamalite.qmatmul_path(x, packed, t, PATHS["avx2"]))
        assert torch.equal(vnni[5:6], torch.ops.llamalite.qmatmul_path(x[5:6], packed, t, PATHS["avx512vnni"]))

@pytest.mark.parametrize("path", ["avx512vnni", "avx512vnni-gemm", "avx2", "portable"])
def test_q6_k_extremes_do_not_overflow(path):
    """Q6_K's largest products: every value -32 at scale -128 (4096 steps of d) against activations all
    at the int16 maximum. A block's 32 products sum past int32 (2^32); the GEMM adds its pair slots in
    two runs of 8 for that reason."""
    if path not in PATHS:
        pytest.skip(f"this CPU has no {path}")
    raw = np.zeros((3, 2 * 210), dtype=np.uint8)  # ql = qh = 0: q = 0, value (0 - 32) * scale * d
    raw.reshape(3, 2, 210)[:, :, 192:208] = np.int8(-128).view(np.uint8)
    raw.reshape(3, 2, 210)[:, :, 208:210] = np.array([2 ** -10], dtype=np.float16).view(np.uint8)
    w = torch.from_numpy(gq.dequantize(raw, T.Q6_K).astype(np.float32)).reshape(3, 512)
    assert (w == 4.0).all()  # 4096 * 2^-10
    packed = torch.ops.llamalite.repack(torch.from_numpy(raw), KERNEL_TYPES["Q6_K"])
    x = torch.full((12, 512), 0.5)
    got = torch.ops.llamalite.qmatmul_path(x, packed, KERNEL_TYPES["Q6_K"], PATHS[path])
    torch.testing.assert_close(got, x @ w.T, rtol=1e-6, atol=0)


def test_bad_shapes_are_refused():
    raw, packed, _ = _weights("Q4_0", 4, 64)
    with pytest.raises(RuntimeError, match="bytes a row"):
        torch.ops.llamalite.qmatmul(torch.randn(1, 96), packed, KERNEL_TYPES["Q4_0"])
    with pytest.raises(ValueError, match="do not hold rows of 96"):
        QuantLinear(raw, "Q4_0", 96)


def test_prefill_in_tiles_equals_one_gemm(monkeypatch):
    import llamalite.runtime.quantized as q

    monkeypatch.setattr(q, "QGEMM", False)  # the fp32 path, as on a CPU without VNNI
    raw, _, w = _weights("Q4_1", 70, 256)
    layer = QuantLinear(raw, "Q4_1", 256)
    x = torch.randn(20, 256)
    whole = layer(x)
    monkeypatch.setattr(q, "GEMM_TILE_BYTES", 16 * 256 * 4)  # tiles of 16 rows: 5 tiles, the last short
    # BLAS blocks a narrower product differently: equal up to float rounding
    torch.testing.assert_close(layer(x), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, F.linear(x, w), rtol=0, atol=0)


def test_quantize_q8_0_matches_ggml():
    w = np.random.default_rng(3).standard_normal((24, 160)).astype(np.float32)
    ours = torch.ops.llamalite.dequantize(torch.ops.llamalite.quantize_q8_0(torch.from_numpy(w)), KERNEL_TYPES["Q8_0"])
    ggml = torch.from_numpy(gq.dequantize(gq.quantize(w, T.Q8_0), T.Q8_0).astype(np.float32))
    torch.testing.assert_close(ours, ggml, rtol=0, atol=0)


def test_fast_rms_norm_matches_the_model_norm():
    from llamalite.model.transformer import RMSNorm
    from llamalite.runtime.quantized import FastRMSNorm

    norm = RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    fast = FastRMSNorm.replacing(norm)
    assert fast.weight is norm.weight
    x = torch.randn(2, 7, 96)
    torch.testing.assert_close(fast(x), norm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast(x.double()), norm(x.double()))  # other dtypes: the PyTorch path


# head_dim 16 and 128: the AVX2 path (8 positions at a time, then a tail); 12: the portable loop
@pytest.mark.parametrize("dim,n_heads", [(96, 6), (48, 4), (256, 2)])
@pytest.mark.parametrize("ctx_len", [5, 30])
def test_fast_attention_step_matches_the_model_attention(dim, n_heads, ctx_len):
    from llamalite.model.config import ModelConfig
    from llamalite.model.transformer import Attention, KVCache
    from llamalite.runtime.quantized import FastAttention

    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=2, vocab_size=10, hidden_dim=64)
    D = cfg.head_dim
    ref = Attention(cfg)
    fast = FastAttention.replacing(ref)
    for att in (ref, fast):
        att.cache = KVCache(2, 2, 40, D, torch.float32)
    ctx = torch.randn(2, ctx_len, dim) * 3  # peaked attention weights too
    angles = torch.arange(ctx_len + 1).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None, :]
    rot = torch.polar(torch.ones_like(angles), angles)
    with torch.no_grad():
        for att in (ref, fast):  # the same cached positions in both
            att(ctx, rot[:ctx_len], torch.arange(ctx_len), torch.ones(ctx_len, ctx_len, dtype=torch.bool).tril(), ctx_len)
        x = torch.randn(2, 1, dim)
        want = ref(x, rot[ctx_len:], torch.tensor([ctx_len]), None, ctx_len + 1)
        got = fast(x, rot[ctx_len:], torch.tensor([ctx_len]), None, ctx_len + 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.cache.k[:, :, :ctx_len + 1], ref.cache.k[:, :, :ctx_len + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("type_name", sorted(KERNEL_TYPES))
def test_qmatmul_multi_equals_separate_products(type_name):
    k = _k(type_name, 96)
    parts = [_weights(type_name, n, k, seed=n)[1] for n in (7, 33, 5)]
    x = torch.randn(2, k)
    joint = torch.ops.llamalite.qmatmul_multi(x, parts, KERNEL_TYPES[type_name])
    separate = torch.cat([torch.ops.llamalite.qmatmul(x, p, KERNEL_TYPES[type_name]) for p in parts], dim=1)
    torch.testing.assert_close(joint, separate, rtol=0, atol=0)


@pytest.mark.parametrize("tables", ["quantized", "dense"])
def test_fast_transformer_step_matches_the_reference_forward(tables):
    """DecodePlan.step (a whole one-token step as one kernel call) against Transformer.forward over the same
    quantized layers, for two rows at different positions of different cache rows: the logits and
    every cache written. Embedding and output layer as blocks (tied, Q8_0) or as fp32 matrices."""
    from llamalite.model.config import ModelConfig
    from llamalite.model.transformer import Transformer
    from llamalite.runtime.quantized import FastTransformer, QuantEmbedding, use_kernels

    cfg = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=40, hidden_dim=64)
    model = Transformer(cfg)
    for li, block in enumerate(model.layers):
        for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")), (block.feed_forward, ("w1", "w2", "w3"))):
            for i, name in enumerate(names):
                lin = getattr(parent, name)
                raw = _weights("Q4_1", lin.out_features, lin.in_features, seed=10 * li + i)[0]
                setattr(parent, name, QuantLinear(raw, "Q4_1", lin.in_features))
        with torch.no_grad():
            block.attention_norm.weight.uniform_(0.5, 1.5)
            block.ffn_norm.weight.uniform_(0.5, 1.5)
    if tables == "quantized":
        model.tok_embeddings = QuantEmbedding(_weights("Q8_0", 40, 96, seed=99)[0], "Q8_0", 96)
        model.output = QuantLinear.sharing(model.tok_embeddings)
    fast = use_kernels(model)
    assert isinstance(fast, FastTransformer) and fast.plan is not None
    fast.setup_caches(3, 40)
    with torch.no_grad():
        for layer in fast.layers:
            layer.attention.cache.k.normal_()
            layer.attention.cache.v.normal_()
    before = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in fast.layers]
    pos, rows, tokens = torch.tensor([[12], [30]]), torch.tensor([2, 0]), torch.tensor([[3], [39]])
    with torch.no_grad():
        want = Transformer.forward(fast, tokens, pos, rows=rows)
        want_caches = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in fast.layers]
        for layer, (k, v) in zip(fast.layers, before):
            layer.attention.cache.k.copy_(k)
            layer.attention.cache.v.copy_(v)
        got = fast(tokens, pos, rows=rows)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for layer, (k, v) in zip(fast.layers, want_caches):
            torch.testing.assert_close(layer.attention.cache.k, k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer.attention.cache.v, v, rtol=1e-6, atol=1e-6)
        # one position shared by the batch, as generate passes it
        shared = torch.tensor([31])
        torch.testing.assert_close(fast(tokens, shared), Transformer.forward(fast, tokens, shared), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
@pytest.mark.parametrize("t13,t2", [("Q4_0", "Q8_0"), ("Q4_1", "Q4_1"), ("Q4_K", "Q6_K")])
@pytest.mark.parametrize("n", [1, 3, 40])  # 40 rows: some experts get more than the dot product's 8 (the GEMM)
def test_experts_op_matches_dequantized_fp32(path, t13, t2, n):
    """Each row through its chosen experts (rows grouped by expert, only those experts' rows read) against
    the gguf package's dequantization in fp64."""
    if path not in PATHS:
        pytest.skip(f"this CPU has no {path}")
    E, k, K, H = 4, 2, 256, 256
    _, w1, d1 = _weights(t13, E * H, K, seed=1)
    _, w3, d3 = _weights(t13, E * H, K, seed=2)
    _, w2, d2 = _weights(t2, E * K, H, seed=3)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, K, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
    wts = torch.rand(n, k, generator=g)
    got = torch.ops.llamalite.experts(x, ids, wts, w1, w3, w2, KERNEL_TYPES[t13], KERNEL_TYPES[t2], E, PATHS[path])
    want = torch.zeros(n, K, dtype=torch.float64)
    d1, d3, d2 = (d.double().view(E, -1, d.shape[1]) for d in (d1, d3, d2))
    for r in range(n):
        for j in range(k):
            e, xr = int(ids[r, j]), x[r].double()
            want[r] += float(wts[r, j]) * (F.silu(d1[e] @ xr) * (d3[e] @ xr)) @ d2[e].T
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-3
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.llamalite.experts(x, ids + E, wts, w1, w3, w2, KERNEL_TYPES[t13], KERNEL_TYPES[t2], E, PATHS[path])


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
@pytest.mark.parametrize("n", [1, 40])
def test_experts_op_with_biases_and_the_clamped_swiglu(path, n):
    """gpt-oss's experts: biases after each projection and (clamp(up) + 1) * g * sigmoid(1.702 g), g = min(gate, 7),
    against the same in fp64 from the dequantized blocks."""
    if path not in PATHS:
        pytest.skip(f"this CPU has no {path}")
    E, k, K, H = 4, 2, 64, 96
    _, w1, d1 = _weights("Q8_0", E * H, K, seed=1)
    _, w3, d3 = _weights("Q8_0", E * H, K, seed=2)
    _, w2, d2 = _weights("Q8_0", E * K, H, seed=3)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, K, generator=g) * 20  # gates past the clamp
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
    wts = torch.rand(n, k, generator=g)
    b1, b3, b2 = torch.randn(E, H, generator=g), torch.randn(E, H, generator=g), torch.randn(E, K, generator=g)
    t = KERNEL_TYPES["Q8_0"]
    got = torch.ops.llamalite.experts(x, ids, wts, w1, w3, w2, t, t, E, PATHS[path], b1, b3, b2, 7.0, 1.702)
    d1, d3, d2 = (d.double().view(E, -1, d.shape[1]) for d in (d1, d3, d2))
    want = torch.zeros(n, K, dtype=torch.float64)
    for r in range(n):
        for j in range(k):
            e, xr = int(ids[r, j]), x[r].double()
            gate, up = (d1[e] @ xr + b1[e]).clamp(max=7.0), (d3[e] @ xr + b3[e]).clamp(-7.0, 7.0)
            want[r] += float(wts[r, j]) * ((up + 1) * gate * torch.sigmoid(1.702 * gate) @ d2[e].T + b2[e])
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3
