"""The continuous-batching engine: a request's greedy tokens are the same alone or in a batch, on the
kernel path (the default model) and the PyTorch path (a tiny model); cancelling frees the slot; a
resent history reuses the cached prefix."""

import pytest

from llamalite.serve.engine import Engine, Finished, Request, TokenEvent
from llamalite.generation.tokens import generate
from llamalite.generation.steps import ContextLengthError
from llamalite.formats.load import load
from llamalite.generation.sampling import GREEDY, SamplingParams
from tests.helpers import save_hf_dir, tiny_hf_model

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Name three colors.",
             "What is 2+2?", "Tell me a joke.", "Who wrote Hamlet?"]


def _tokens(request: Request) -> tuple[list[int], Finished]:
    events = list(request)
    return [e.token for e in events if isinstance(e, TokenEvent)], events[-1]


def _run(engine: Engine, prompts, **kwargs) -> list[list[int]]:
    requests = [engine.submit(Request(p, **kwargs)) for p in prompts]
    return [_tokens(r)[0] for r in requests]


@pytest.fixture(scope="module")
def chat_prompts(default_lm):
    from llamalite.text.chat_template import render_chat

    tok = default_lm.tokenizer
    return [tok.encode(render_chat(default_lm.chat_template, tok, [{"role": "user", "content": q}]), add_bos=False)
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def engine(default_model_file):
    lm = load(default_model_file)  # its own copy: the engine owns the model's caches
    engine = Engine(lm.model, max_batch=4, max_seq_len=256).start()
    yield engine
    engine.stop()


def test_batched_greedy_equals_solo_on_the_kernel_path(engine, chat_prompts, default_lm):
    kw = dict(max_tokens=24, stop_ids=default_lm.tokenizer.end_ids)
    solo = [_run(engine, [p], **kw)[0] for p in chat_prompts]
    together = _run(engine, chat_prompts, **kw)  # 6 requests over 4 slots: two join as others leave
    assert together == solo
    assert engine.stats["largest_batch"] >= 2
    # and the engine's solo run is what plain generate() produces
    ref = list(generate(default_lm.model, chat_prompts[0], max_new_tokens=24, sampling=GREEDY,
                        stop_ids=default_lm.tokenizer.end_ids))
    assert solo[0] == ref
    assert "Paris" in default_lm.tokenizer.decode(solo[0])


def test_batched_greedy_equals_solo_on_the_pytorch_path(tmp_path):
    lm = load(save_hf_dir(tiny_hf_model(), tmp_path / "hf"))
    engine = Engine(lm.model, max_batch=3, max_seq_len=64)
    engine.start()
    try:
        prompts = [[1, 5, 9, 200], [1, 17, 250, 3, 99, 42, 7], [1, 300], [1, 8, 8, 8, 8, 8, 8, 8, 8, 8]]
        solo = [_run(engine, [p], max_tokens=12)[0] for p in prompts]
        assert _run(engine, prompts, max_tokens=12) == solo
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible_in_any_batch(engine, chat_prompts):
    hot = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = _run(engine, chat_prompts[:1], max_tokens=16, sampling=hot, seed=7)
    b = _run(engine, chat_prompts[:3], max_tokens=16, sampling=hot, seed=7)
    assert a[0] == b[0]


def test_cancel_frees_the_slot_and_reports_cancelled(engine, chat_prompts):
    request = engine.submit(Request(chat_prompts[1], max_tokens=200))
    events = iter(request)
    assert isinstance(next(events), TokenEvent)
    request.cancel()
    last = [e for e in events][-1]
    assert isinstance(last, Finished) and last.reason == "cancelled" and last.completion_tokens < 200
    assert engine.active == 0


def test_resent_history_reuses_the_cached_prefix(engine, chat_prompts):
    tokens, first = _tokens(engine.submit(Request(chat_prompts[2], max_tokens=8)))
    follow_up = chat_prompts[2] + tokens + [5, 6, 7]
    _, second = _tokens(engine.submit(Request(follow_up, max_tokens=4)))
    assert second.cached_tokens >= len(chat_prompts[2]) + len(tokens) - 1


def test_requests_beyond_the_context_are_refused(engine):
    with pytest.raises(ContextLengthError, match="context is 256"):
        engine.submit(Request(list(range(1, 250)), max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        Request([], max_tokens=4)


def test_a_failing_forward_fails_its_requests_not_the_engine(tmp_path):
    lm = load(save_hf_dir(tiny_hf_model(), tmp_path / "hf"))
    engine = Engine(lm.model, max_batch=2, max_seq_len=64).start()
    try:
        bad = engine.submit(Request([1, 5, 10_000], max_tokens=4))  # id outside the vocabulary
        assert _tokens(bad)[1].reason == "error"
        assert len(_run(engine, [[1, 5, 9]], max_tokens=4)[0]) == 4
    finally:
        engine.stop()


def test_a_cancelled_request_leaves_the_queue_from_anywhere_in_it(default_model_file):
    """A client gone while its request waits behind others frees its place at the next step, not when it
    reaches the head of the queue."""
    lm = load(default_model_file)
    engine = Engine(lm.model, max_batch=1, max_seq_len=64)
    requests = [engine.submit(Request([1, 2, 3], max_tokens=8)) for _ in range(4)]
    engine.step()  # the first is admitted; three wait
    assert engine.queue_depth == 3
    requests[2].cancel()
    engine.step()
    assert engine.queue_depth == 2 and list(requests[2])[-1] == Finished("cancelled", 3, 0)
