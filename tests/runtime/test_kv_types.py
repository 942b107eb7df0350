"""KV cache types (--kv-type f32, f16, bf16, q8_0): the kernels' attention reads each type as it is
stored, on every SIMD path, and agrees with the model's attention over the same stored values; each
type's error against an fp32 cache; what a cache of each type costs in bytes; the flag and its errors."""

import subprocess
import sys

import pytest
import torch

from llamalite.model.config import ModelConfig
from llamalite.model.transformer import KV_TYPES, Attention, KVCache
from llamalite.kernels.ops import kernels_available, simd_paths

pytestmark = pytest.mark.skipif(not kernels_available(), reason="llamalite.kernels._cpu is not built")

# a type's rounding of keys and values, as relative error of an attention output against fp32's
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}


def _rot(n: int, D: int) -> torch.Tensor:
    angles = torch.arange(n).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def _attention_step(kind: str, dim: int = 256, n_heads: int = 4, ctx_len: int = 37):
    """The model's attention and the kernels' (FastAttention) over caches of `kind` filled with the same
    cached positions; the next step's output of each, and the reference's with an fp32 cache."""
    from llamalite.runtime.quantized import FastAttention

    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=2, vocab_size=10, hidden_dim=64)
    D = cfg.head_dim
    ref = Attention(cfg)
    exact = Attention(cfg)
    exact.load_state_dict(ref.state_dict())
    fast = FastAttention.replacing(ref)
    ref.cache, fast.cache = KVCache(2, 2, 48, D, kind), KVCache(2, 2, 48, D, kind)
    exact.cache = KVCache(2, 2, 48, D, "f32")
    ctx = torch.randn(2, ctx_len, dim) * 3  # peaked attention weights too
    rot = _rot(ctx_len + 1, D)
    outs = []
    with torch.no_grad():
        for att in (ref, fast, exact):
            att(ctx, rot[:ctx_len], torch.arange(ctx_len), torch.ones(ctx_len, ctx_len, dtype=torch.bool).tril(),
                ctx_len)
        x = torch.randn(2, 1, dim)
        for att in (ref, fast, exact):
            outs.append(att(x, rot[ctx_len:], torch.tensor([ctx_len]), None, ctx_len + 1))
    return ref, fast, outs


@pytest.mark.parametrize("kind", KV_TYPES)
def test_the_kernels_read_each_type_as_the_model_does(kind):
    """One decode step: the kernels' attention over a cache of `kind` equals the model's attention over
    the same stored values (fp32 maths on the rounded keys and values), the key and value it writes are
    the model's rounded the same way, and the output is within the type's rounding of an fp32 cache's."""
    ref, fast, (want, got, exact) = _attention_step(kind)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    at = 37  # the position the step wrote
    for name in ("k", "v"):
        written = [c._load(getattr(c, name)[:, :, at:at + 1], torch.float32) for c in (ref.cache, fast.cache)]
        torch.testing.assert_close(written[1], written[0], rtol=0, atol=2 * float(written[0].abs().max()) / 127)
    err = float((got - exact).abs().max() / exact.abs().max())
    assert err < TOLERANCE[kind], (kind, err)


@pytest.mark.parametrize("kind", KV_TYPES)
@pytest.mark.parametrize("path", [name for name, _ in simd_paths()])
def test_every_simd_path_reads_each_type_alike(kind, path):
    """decode_attention on each path this CPU has (the portable loop reads a row at a time into fp32;
    AVX2 converts 8 values at a time inside its loops) against the portable path, on copies of one
    cache: the same outputs, and the same bytes written."""
    number = dict(simd_paths())[path]
    D, H, KV, B, S = 64, 4, 2, 3, 40
    cache = KVCache(B, KV, S, D, kind)
    with torch.no_grad():
        cache.update(torch.arange(30), torch.randn(B, KV, 30, D), torch.randn(B, KV, 30, D), 30)
    q, k, v = torch.randn(B, H * D), torch.randn(B, KV * D), torch.randn(B, KV * D)
    cos_sin = torch.view_as_real(_rot(40, D)[torch.tensor([30, 12, 29])])  # (B, D/2, 2)
    pos, rows = torch.tensor([30, 12, 29]), torch.tensor([1, 0, 2])
    results = []
    for p in (1, number):  # 1: the portable path
        kc, vc = cache.k.clone(), cache.v.clone()
        out = torch.ops.llamalite.decode_attention(q, k, v, cos_sin, kc, vc, pos, rows, H, KV, p)
        results.append((out, kc, vc))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1][1], results[0][1]) and torch.equal(results[1][2], results[0][2])


def test_what_each_type_costs_per_token():
    """Bytes of keys and values a token takes, per layer and head: f16 and bf16 half of f32's, q8_0 34
    bytes a block of 32 values (0.27x of f32, 0.53x of f16)."""
    sizes = {kind: KVCache(1, 1, 1, 64, kind).k.nbytes for kind in KV_TYPES}
    assert sizes == {"f32": 256, "f16": 128, "bf16": 128, "q8_0": 68}


def test_each_type_on_the_default_model(default_lm):
    """The whole model decoding 16 greedy tokens after a prompt, the kernels' one-call step reading a
    cache of each type: logits within each type's rounding of the fp32 cache's, and f16 (the default on
    CPUs) keeps the fp32 cache's greedy tokens."""
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    model = default_lm.model
    ids = default_lm.tokenizer.encode("The history of the city of Paris goes back to the " * 6)
    runs = {}
    for kind in KV_TYPES:
        model.setup_caches(1, 256, kind)
        with torch.no_grad():
            model(torch.tensor([ids]), torch.arange(len(ids)))
            step = model(torch.tensor([[ids[0]]]), torch.tensor([len(ids)]))[0, -1]
        runs[kind] = (step, list(generate(model, ids, max_new_tokens=16, sampling=GREEDY)))
    model.setup_caches(1, 256)  # the model's own type again, for the session's other tests
    base, tokens = runs["f32"]
    for kind, (step, _) in runs.items():
        err = float((step - base).abs().max() / base.abs().max())
        assert err < 10 * TOLERANCE[kind], (kind, err)
    assert runs["f16"][1] == tokens
    assert model.layers[0].attention.cache.k.dtype == torch.float16  # load() chose f16 for the CPU kernels


def test_the_flag(default_model_file, tmp_path):
    """--kv-type on generate and bench: q8_0 gives a reply, bench reports the type; a model whose
    head_dim does not divide by 32 refuses q8_0 with what to use instead; an unknown type is refused."""
    import json

    from llamalite.formats.load import load
    from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

    run = subprocess.run([sys.executable, "-m", "llamalite", "generate", "--kv-type", "q8_0", "-t", "0", "-n", "8",
                          "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    bench = subprocess.run([sys.executable, "-m", "llamalite", "bench", "--json", "--kv-type", "bf16", "--repeats", "1",
                            "--prompt-tokens", "8", "--gen-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0 and json.loads(bench.stdout)["kv_type"] == "bf16", bench.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "llamalite", "generate", "--kv-type", "q4_0", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "invalid choice: 'q4_0'" in bad.stderr
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)
    weights = {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model()).items()}
    path = write_gguf(tmp_path / "tiny.gguf", weights, cfg, tensor_type="Q8_0")
    lm = load(path, kv_type="q8_0")  # head_dim 16
    with pytest.raises(ValueError, match="head_dim that divides by 32.*use f16"):
        lm.model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="unknown KV cache type 'f8'"):
        load(path, kv_type="f8")


def test_the_server_decodes_through_the_models_kv_type(default_model_file):
    """`serve --kv-type q8_0` loads the model with it: the engine's slots are q8_0 caches, and greedy
    replies to two prompts decoded together through them are what `generate` gives with that type."""
    from llamalite.generation.tokens import generate
    from llamalite.formats.load import load
    from llamalite.generation.sampling import GREEDY
    from llamalite.serve.engine import Engine, Request, TokenEvent

    lm = load(default_model_file, kv_type="q8_0")
    prompts = [lm.tokenizer.encode(p) for p in ("The capital of France is", "Once upon a time")]
    want = [list(generate(lm.model, p, max_new_tokens=12, sampling=GREEDY)) for p in prompts]
    engine = Engine(lm.model, max_batch=2, max_seq_len=256).start()
    try:
        assert lm.model.layers[0].attention.cache.k.dtype == torch.uint8
        requests = [engine.submit(Request(p, max_tokens=12, sampling=GREEDY)) for p in prompts]
        got = [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests]
    finally:
        engine.stop()
    assert got == want
