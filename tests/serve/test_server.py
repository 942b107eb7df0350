"""The OpenAI-compatible server, driven by the official `openai` client (and raw HTTP for what a
client library would refuse to send), on 127.0.0.1 and an ephemeral port."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llamalite.model.config import ModelConfig
from llamalite.formats.load import load
from llamalite.serve import BackgroundServer, Server, create_app, wait_until_serving
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

openai = pytest.importorskip("openai", reason="the test extras install openai: pip install -e '.[test]'")

MODEL = "smollm2"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Who wrote Hamlet?",
             "Tell me a joke.", "What is the largest planet?", "Say hello in Spanish.", "What color is the sky?"]


def _chat(client, text, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


def _stream_chat(client, text, **kw) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in _chat(client, text, stream=True, **kw):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


def test_chat_completion(client, served):
    r = _chat(client, "What is the capital of France?", temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    # usage counts the rendered prompt and every generated token
    lm = served[1].lm
    from llamalite.text.chat_template import render_chat

    prompt = lm.tokenizer.encode(render_chat(lm.chat_template, lm.tokenizer,
                                             [{"role": "user", "content": "What is the capital of France?"}]),
                                 add_bos=False)
    assert r.usage.prompt_tokens == len(prompt)
    content_tokens = lm.tokenizer.encode(r.choices[0].message.content, add_bos=False)
    assert abs(r.usage.completion_tokens - len(content_tokens)) <= 1  # + the end token's absence
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_length_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.choices[0].text.strip()
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text


def test_streaming_equals_non_streaming(client):
    whole = _chat(client, "Name three colors.", temperature=0, max_tokens=40)
    text, finish = _stream_chat(client, "Name three colors.", temperature=0, max_tokens=40)
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    pieces = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert pieces[-1].usage.completion_tokens == 12 and pieces[-1].choices == []
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert "".join(c.choices[0].text for c in pieces[:-1]) == plain.choices[0].text
    again = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    usage = again[-1].usage  # the prompt's prefix came from the KV cache, reported as the whole reply reports it
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1 == plain.usage.prompt_tokens - 1


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    assert " 6" in full.text, full.text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[" 6"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.index(" 6")]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=" 6", stream=True))
    assert streamed == stopped.text


def test_seed_reproducibility_and_n(client):
    kw = dict(temperature=1.0, max_tokens=16, seed=1234)
    a = _chat(client, "Write a sentence about cats.", **kw).choices[0].message.content
    b = _chat(client, "Write a sentence about cats.", **kw).choices[0].message.content
    assert a == b
    many = _chat(client, "Write a sentence about cats.", n=3, **kw)
    texts = [c.message.content for c in sorted(many.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(many.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts[0] == a and len(set(texts)) > 1  # choice i is seeded with seed + i


def test_echo_with_logprobs_scores_the_prompt(client, default_lm):
    """What lm-eval's local-completions reads: the prompt's own token log-probabilities."""
    from llamalite.eval.scoring import encode_pair, loglikelihood

    prompt = "The capital of France is Paris"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp, tok = r.choices[0].logprobs, default_lm.tokenizer
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(tok.encode(prompt)) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ctx, cont = encode_pair(tok, "The capital of France is", " Paris")
    want, greedy = loglikelihood(default_lm.model, ctx, cont)
    assert sum(lp.token_logprobs[-len(cont):]) == pytest.approx(want, abs=2e-3) and greedy
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-5)
    # echo with generation: the prompt's scores, then the new tokens'
    more = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=0, temperature=0)
    assert len(more.choices[0].logprobs.token_logprobs) == len(lp.tokens) + more.usage.completion_tokens
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_logprobs(client):
    r = _chat(client, "What is 2+2?", temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy took the best token
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 2 and "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0


def test_concurrent_streams_equal_their_solo_runs(client, served):
    kw = dict(temperature=0, max_tokens=32)
    solo = [_stream_chat(client, q, **kw) for q in QUESTIONS]
    served[1].engine.stats["largest_batch"] = 0
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: _stream_chat(client, q, **kw), QUESTIONS))
    assert together == solo
    assert served[1].engine.stats["largest_batch"] >= 4  # they really were decoded together


def test_resent_history_reuses_the_cache(client):
    first = _chat(client, "Who wrote Hamlet?", temperature=0, max_tokens=20)
    history = [{"role": "user", "content": "Who wrote Hamlet?"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "When was he born?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_tokenize_detokenize_models_health_metrics(served, client):
    url = served[0]
    ids = httpx.post(url + "/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert ids == served[1].tokenizer.encode("Hello world")
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json()["content"] == "Hello world"
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    metrics = httpx.get(url + "/metrics").text
    for name in ("llamalite_requests_total", "llamalite_generated_tokens_total", "llamalite_queue_depth",
                 "llamalite_request_latency_seconds_bucket", "llamalite_time_to_first_token_seconds_count"):
        assert name in metrics
    assert httpx.get(url + "/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_a_client_leaving_mid_stream_frees_its_slot(served):
    url, server = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 900, "stream": True, "temperature": 0.7}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.engine.active == 1
    deadline = time.monotonic() + 10
    while server.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.active == 0
    assert server.engine.stats["generated_tokens"] > 0


# ----- bad input, on a tiny model with an API key ------------------------------------------------------

KEY = "sk-test"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = tiny_hf_model()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf",
                      {k: v.numpy() for k, v in meta_weights_from_hf(ref).items()}, cfg, tensor_type="Q8_0")
    server = Server(load(path), "tiny", max_batch=2, api_key=KEY)
    with BackgroundServer(create_app(server)) as url:
        yield url


def _post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None and raw is None:
        return httpx.get(url + path, headers=headers)
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers)


BAD = [  # (what, path, body or raw bytes, status, words in the message)
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("not an object", "/v1/chat/completions", b"[1, 2, 3]", 400, "invalid request"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("max_tokens beyond the context", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 256}, 400,
     "context"),
    ("negative max_tokens", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens without echo", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400,
     "max_tokens"),
    ("negative temperature", "/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400,
     "temperature"),
    ("absurd temperature", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e9}, 400, "temperature"),
    ("absurd n", "/v1/completions", {"model": "tiny", "prompt": "hi", "n": 10000}, 400, "n"),
    ("top_p zero", "/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("penalty out of range", "/v1/completions", {"model": "tiny", "prompt": "hi", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("too many stops", "/v1/completions", {"model": "tiny", "prompt": "hi", "stop": list("abcde")}, 400, "stop"),
    ("prompt longer than the context", "/v1/completions", {"model": "tiny", "prompt": list(range(1, 300))}, 400,
     "context"),
    ("token outside the vocabulary", "/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "vocabulary"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "empty"),
    ("wrong field type", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "lots"}, 400,
     "max_tokens"),
    ("stop string too long", "/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["s" * 1001]}, 400, "stop"),
    ("too many generations", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 70, "n": 16}, 400, "prompts x n"),
    ("lone surrogate", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc80"}]}',
     400, "surrogate"),
    ("prompt text beyond any context", "/v1/completions", {"model": "tiny", "prompt": "p" * 200_000}, 400, "characters"),
    ("body over the cap", "/v1/completions", {"model": "tiny", "prompt": "p" * (2 << 20)}, 413, "--max-body"),
    ("unknown model id", "/v1/models/gpt-4", None, 404, "does not exist"),
    ("detokenize bad id", "/detokenize", {"tokens": [5, 400]}, 400, "vocabulary"),
    ("negative token id", "/detokenize", {"tokens": [-5]}, 400, "tokens"),
]


@pytest.mark.parametrize("what,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(tiny, what, path, body, status, words):
    r = _post(tiny, path, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower() and error["type"]


def test_api_key_is_required_when_set(tiny):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for key in (None, "wrong"):
        r = _post(tiny, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=tiny + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    assert httpx.get(tiny + "/health").status_code == 200  # health and the page stay open


def test_server_still_answers_after_bad_input(tiny):
    for _, path, body, _, _ in BAD:
        _post(tiny, path, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
    assert httpx.get(tiny + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}).json()["error"]["type"] == \
        "not_found_error"
    c = openai.OpenAI(base_url=tiny + "/v1", api_key=KEY, max_retries=0)
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens + (r.choices[0].finish_reason == "stop") >= 1
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    lines = _post(tiny, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}).text
    assert lines.rstrip().endswith("data: [DONE]")
    assert all(json.loads(line[6:]) for line in lines.split("\n\n") if line.startswith("data: {"))


def test_schemathesis_finds_no_server_error(tiny, tmp_path):
    """Property-based requests generated from /openapi.json (valid and invalid bodies): never a 5xx."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("schemathesis") or str((__import__("pathlib").Path(sys.executable).parent / "schemathesis"))
    run = subprocess.run([exe, "run", tiny + "/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", "25", "--seed", "1", "--workers", "1", "-H", f"Authorization: Bearer {KEY}",
                          "--no-color", "--generation-database", "none", "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    import re

    # every generated case passed (warnings, such as stored-response ids schemathesis cannot guess, may remain)
    cases = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert cases and cases.group(1) == cases.group(2), run.stdout[-4000:]
    tested, selected = re.search(r"Tested: (\d+)", run.stdout), re.search(r"Selected: (\d+)/(\d+)", run.stdout)
    assert tested and selected and tested.group(1) == selected.group(1) == selected.group(2), run.stdout[-2000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_llamalite_serve_shuts_down_cleanly(sig):
    """Ctrl-C or a service manager's SIGTERM: the process exits 0 at once and a stream in flight ends
    with an error event and [DONE] instead of hanging."""
    import signal
    import socket
    import subprocess
    import sys
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llamalite", "serve", "--port", str(port), "--model-name", "m"],
                            stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=60)
        lines: list[str] = []
        body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
                "max_tokens": 900, "temperature": 0.8}

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        while len(lines) < 3 and reader.is_alive():
            time.sleep(0.05)
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert lines[-1] == "data: [DONE]" and "shutting down" in lines[-2]
    finally:
        proc.kill()
