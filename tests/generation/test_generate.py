import pytest
import torch

from llamalite.model.config import ModelConfig
from llamalite.generation.tokens import generate
from llamalite.generation.steps import ContextLengthError, fit_prompt
from llamalite.generation.stream import Completion, stream_text
from llamalite.formats.build import build_model
from llamalite.generation.sampling import GREEDY, SamplingParams, apply_penalties, filter_logits, sample
from tests.helpers import meta_weights_from_hf, tiny_hf_model


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128)
    return build_model(cfg, meta_weights_from_hf(tiny_hf_model()), torch.float32)


def _greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_argmax_of_full_forward(tiny):
    prompt = [5, 17, 250, 3]
    assert list(generate(tiny, prompt, max_new_tokens=20, sampling=GREEDY)) == _greedy_reference(tiny, prompt, 20)


def test_cached_prefix_is_reused_and_gives_the_same_tokens(tiny):
    first = [5, 17, 250, 3, 9, 9]
    list(generate(tiny, first, max_new_tokens=5, sampling=GREEDY))
    assert tiny.cache_tokens[:len(first)] == first
    longer = first + [44, 45]
    calls = []
    hook = tiny.layers[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    try:
        out = list(generate(tiny, longer, max_new_tokens=5, sampling=GREEDY))
    finally:
        hook.remove()
    assert calls[0] == 2  # only the two new prompt tokens were computed
    assert out == _greedy_reference(tiny, longer, 5)


def test_seed_makes_sampling_reproducible(tiny):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    runs = [list(generate(tiny, [1, 2, 3], max_new_tokens=30, sampling=params,
                          generator=torch.Generator().manual_seed(s))) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_ids_end_generation_and_report_stop(tiny):
    prompt = [5, 17, 250, 3]
    expected = _greedy_reference(tiny, prompt, 10)
    stop_at = expected[3]
    gen = generate(tiny, prompt, max_new_tokens=10, sampling=GREEDY, stop_ids=[stop_at])
    got = []
    with pytest.raises(StopIteration) as done:
        while True:
            got.append(next(gen))
    assert got == expected[:expected.index(stop_at)]
    assert done.value.value == "stop"


def test_generation_ends_at_the_context(tiny):
    prompt = list(range(1, 120))
    out = list(generate(tiny, prompt, max_new_tokens=50, sampling=GREEDY))
    assert len(out) == 128 - 119


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    with pytest.raises(ContextLengthError, match="the prompt is 200 tokens but the model's context is 128"):
        list(generate(tiny, list(range(200)), max_new_tokens=5))
    assert fit_prompt(list(range(200)), 128, truncate=True) == list(range(73, 200))
    out = list(generate(tiny, list(range(200)), max_new_tokens=1, sampling=GREEDY, truncate=True))
    assert len(out) == 1
    with pytest.raises(ValueError, match="empty"):
        list(generate(tiny, [], max_new_tokens=5))


class CharTokenizer:
    """Each id is one character: enough to drive stream_text."""

    def stream(self):
        tok = self

        class D:
            def push(self, i):
                return chr(i)

            def flush(self):
                return ""
        return D()


def _ids(text):
    yield from (ord(c) for c in text)
    return "length"


def test_stop_strings_are_held_back_and_not_emitted():
    done = Completion()
    pieces = list(stream_text(CharTokenizer(), _ids("Hello END world"), stop=["END"], completion=done))
    assert "".join(pieces) == "Hello "
    assert done.finish_reason == "stop" and done.text == "Hello "
    # A partial match that turns out not to be a stop string is emitted in full.
    done = Completion()
    assert "".join(stream_text(CharTokenizer(), _ids("an EN dash"), stop=["END"], completion=done)) == "an EN dash"
    assert done.finish_reason == "length"


class PieceTokenizer:
    """Each id indexes a list of text pieces: token boundaries of our choosing."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream(self):
        pieces = self.pieces

        class D:
            def push(self, i):
                return pieces[i]

            def flush(self):
                return ""
        return D()


def _expected_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: the text up to the first place a stop string ends (the longest one ending there)."""
    ends = [(text.index(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text, False
    end, neg = min(ends)
    return text[:end + neg], True


def test_stop_strings_match_a_reference_on_random_text_and_token_boundaries():
    import random

    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] if text else []
        done = Completion()

        def ids():
            yield from range(len(pieces))
            return "length"
        got = "".join(stream_text(PieceTokenizer(pieces), ids(), stop=stops, completion=done))
        want, stopped = _expected_stop(text, stops)
        assert (got, done.finish_reason == "stop") == (want, stopped), (text, stops, pieces)


def test_long_stop_strings_take_linear_time():
    """Four 100k-character stop strings over a long text: the held-back search is not quadratic."""
    import time

    stops = ["x" * 99_999 + str(k) for k in range(4)]
    t = time.perf_counter()
    got = "".join(stream_text(CharTokenizer(), _ids("x" * 150_000 + "3"), stop=stops))
    assert got == "x" * 50_001
    assert time.perf_counter() - t < 5  # quadratic matching takes hours here


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero().flatten().tolist()
    assert kept(top_k=2, top_p=1.0, min_p=0.0) == [0, 1]
    assert kept(top_k=0, top_p=0.7, min_p=0.0) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(top_k=0, top_p=0.71, min_p=0.0) == [0, 1, 2]
    assert kept(top_k=0, top_p=1.0, min_p=0.25) == [0, 1, 2]  # >= 0.125
    assert kept(top_k=0, top_p=0.01, min_p=0.0) == [0]  # the best token always survives


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    p = SamplingParams(repetition_penalty=2.0)
    assert apply_penalties(logits, [0, 1], p).tolist() == [1.0, -4.0, 1.0, 0.5]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits, [2, 2, 3], p).tolist() == [2.0, -2.0, 0.0, -0.25]
    assert sample(logits, GREEDY, history=[0], generator=None) == 0
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=4.0), history=[0]) == 2


def test_bad_sampling_parameters_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=2), dict(presence_penalty=3)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    from llamalite.generation.steps import compile_decode

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128)
    eager = build_model(cfg, meta_weights_from_hf(tiny_hf_model()), torch.float32)
    compiled = build_model(cfg, meta_weights_from_hf(tiny_hf_model()), torch.float32)
    compile_decode(compiled)
    prompt = [5, 17, 250, 3]
    assert list(generate(compiled, prompt, max_new_tokens=16, sampling=GREEDY)) == list(
        generate(eager, prompt, max_new_tokens=16, sampling=GREEDY))


def test_a_tiny_temperature_draws_the_best_token():
    from llamalite.generation.sampling import SamplingParams, sample

    logits = torch.tensor([1.0, 3.0, 2.5, -1.0]) * 1000
    for t in (1e-300, 5e-324, 1e-6):
        p = SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0)
        assert sample(logits, p, generator=torch.Generator().manual_seed(0)) == 1


def test_a_vanishing_top_p_keeps_the_best_token():
    logits = torch.tensor([0.5, 2.0, 1.0])
    kept = filter_logits(logits, SamplingParams(top_k=0, top_p=8e-101, min_p=0.0))
    assert torch.isfinite(kept).tolist() == [False, True, False]


def test_generate_after_a_batched_cache_setup():
    ref = tiny_hf_model()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=128)
    model = build_model(cfg, meta_weights_from_hf(ref), torch.float32).eval()
    expected = list(generate(model, [1, 5, 9], max_new_tokens=5, sampling=GREEDY))
    model.setup_caches(4, 64)  # as the batching engine leaves it
    assert list(generate(model, [1, 5, 9], max_new_tokens=5, sampling=GREEDY)) == expected


def test_absurd_repetition_penalties_are_refused():
    with pytest.raises(ValueError, match=r"repetition_penalty must be in \[0.01, 100\]"):
        SamplingParams(repetition_penalty=1e-308)
