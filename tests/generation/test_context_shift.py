"""Context shift (generate/chat --context-shift, --keep): a full cache keeps its first tokens, drops half
of the rest and moves the others down with their keys turned back in place; the next step's logits are
a recomputed cache's, for each KV type, and generation goes on past the context."""

import subprocess
import sys

import pytest
import torch

from llamalite.model.config import ModelConfig
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

# the shifted cache's rounding against the recomputed one, relative to the largest value compared
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2}
IDS = list(range(10, 70))  # 60 tokens
KEEP, DISCARD = 4, 28
KEPT = IDS[:KEEP] + IDS[KEEP + DISCARD:]  # 32


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    cfg = ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)
    weights = {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model(num_hidden_layers=1, hidden_size=128)).items()}
    return write_gguf(tmp_path_factory.mktemp("shift") / "one-layer.gguf", weights, cfg, tensor_type="F32")


def _shifted_and_recomputed(model, kind):
    """Caches of `kind`: IDS prefilled then shifted (KEEP kept, DISCARD dropped), and KEPT prefilled at
    their new positions; each with the next step's logits."""
    out = []
    with torch.no_grad():
        for shift in (True, False):
            model.setup_caches(1, 64, kind)
            if shift:
                model(torch.tensor([IDS]), torch.arange(len(IDS)))
                model.shift_caches(KEEP, DISCARD, len(IDS))
            else:
                model(torch.tensor([KEPT]), torch.arange(len(KEPT)))
            caches = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
            logits = model(torch.tensor([[IDS[7]]]), torch.tensor([len(KEPT)]))[0, -1]
            out.append((caches, logits))
    return out


@pytest.mark.parametrize("kind", sorted(TOLERANCE))
def test_a_shifted_cache_equals_a_recomputed_one(one_layer_model, kind):
    """In a one-layer model a position's key and value depend on its token alone, so the shifted cache is
    what recomputing the kept tokens at their new positions gives: the keys turned back in place equal
    the recomputed keys, and the next step's logits agree, within the type's rounding."""
    from llamalite.formats.load import load

    model = load(one_layer_model).model
    (shifted, a), (recomputed, b) = _shifted_and_recomputed(model, kind)
    load_ = model.layers[0].attention.cache._load
    k1, k2 = (load_(c[0][0][:, :, :len(KEPT)], torch.float32) for c in (shifted, recomputed))
    assert float((k1 - k2).abs().max() / k2.abs().max()) < TOLERANCE[kind]
    assert float((a - b).abs().max() / b.abs().max()) < TOLERANCE[kind]


@pytest.mark.parametrize("kind", sorted(TOLERANCE))
def test_the_default_models_cache_after_a_shift(default_lm, kind):
    """On a real model the deeper layers' keys and values also carry the dropped tokens' context (what a
    context shift trades for not recomputing, in llama.cpp as here): its first layer's keys are the
    recomputed ones, every layer's values are the moved ones, bit for bit, and the first KEEP stay."""
    model = default_lm.model
    (shifted, _), (recomputed, _) = _shifted_and_recomputed(model, kind)
    with torch.no_grad():
        model.setup_caches(1, 64, kind)
        model(torch.tensor([IDS]), torch.arange(len(IDS)))
        before = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
    load_ = model.layers[0].attention.cache._load
    model.setup_caches(1, 256)
    k1, k2 = (load_(c[0][0][:, :, :len(KEPT)], torch.float32) for c in (shifted, recomputed))
    assert float((k1 - k2).abs().max() / k2.abs().max()) < TOLERANCE[kind]
    for (k, v), (k0, v0) in zip(shifted, before):
        assert torch.equal(v[:, :, KEEP:len(KEPT)], v0[:, :, KEEP + DISCARD:len(IDS)])
        assert torch.equal(k[:, :, :KEEP], k0[:, :, :KEEP]) and torch.equal(v[:, :, :KEEP], v0[:, :, :KEEP])


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A tiny random model whose context is 64 tokens."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=64)
    weights = {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model()).items()}
    return write_gguf(tmp_path_factory.mktemp("shift") / "ctx64.gguf", weights, cfg, tensor_type="Q8_0")


def test_generation_goes_on_past_the_context(short_context_model):
    from llamalite.generation.tokens import generate
    from llamalite.formats.load import load
    from llamalite.generation.sampling import GREEDY

    lm = load(short_context_model)
    prompt = list(range(10, 50))
    assert len(list(generate(lm.model, prompt, max_new_tokens=200, sampling=GREEDY))) == 64 - 40
    shifts = []
    original = lm.model.shift_caches
    lm.model.shift_caches = lambda *a, **k: (shifts.append(a), original(*a, **k))
    out = list(generate(lm.model, prompt, max_new_tokens=200, sampling=GREEDY, context_shift=True, keep=8))
    assert len(out) == 200
    assert shifts[0] == (8, 28, 64) and all(s == (8, 28, 64) for s in shifts)  # 8 kept, half of 56 dropped
    assert len(lm.model.cache_tokens) <= 64 and lm.model.cache_tokens[:8] == prompt[:8]
    # until the cache is full, the tokens of a generation without the shift
    assert out[:24] == list(generate(lm.model, prompt, max_new_tokens=24, sampling=GREEDY))
    # keep the whole prompt (-1): nothing is left to drop once the prompt fills the context
    assert len(list(generate(lm.model, list(range(10, 73)), max_new_tokens=50, sampling=GREEDY,
                             context_shift=True, keep=-1))) == 2


def test_the_flags(short_context_model):
    run = subprocess.run([sys.executable, "-m", "llamalite", "generate", "--model", str(short_context_model), "-t", "0",
                          "-n", "150", "--context-shift", "--keep", "4", "hello there"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_server_shifts_each_slot_on_its_own(short_context_model):
    """`serve --context-shift`: a request whose max_tokens outgrows its slot is accepted, and decoded
    next to another request in the batch, each slot shifting on its own, it gives what generate gives;
    without the flag the same request is refused with the context's size."""
    from llamalite.generation.tokens import generate
    from llamalite.generation.steps import ContextLengthError
    from llamalite.formats.load import load
    from llamalite.generation.sampling import GREEDY
    from llamalite.serve.engine import Engine, Request, TokenEvent

    lm = load(short_context_model)
    prompts = [list(range(10, 50)), list(range(100, 120))]
    want = [list(generate(lm.model, p, max_new_tokens=150, sampling=GREEDY, context_shift=True, keep=8))
            for p in prompts]
    engine = Engine(lm.model, max_batch=2, max_seq_len=64, context_shift=True, keep=8).start()
    try:
        requests = [engine.submit(Request(p, max_tokens=150, sampling=GREEDY)) for p in prompts]
        got = [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests]
    finally:
        engine.stop()
    assert got == want and all(len(g) == 150 for g in got)
    plain = Engine(lm.model, max_batch=1, max_seq_len=64)
    with pytest.raises(ContextLengthError, match="context is 64 tokens"):
        plain.submit(Request(prompts[0], max_tokens=150, sampling=GREEDY))
