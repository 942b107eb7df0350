"""Anthropic's Messages API driven by the official `anthropic` SDK (and raw HTTP for what it would
refuse to send): text, streaming events, stop sequences, a tool round trip, count_tokens, x-api-key
and Anthropic-shaped errors."""

import json

import httpx
import pytest

from llamalite.formats.load import load
from llamalite.serve import BackgroundServer, Server, create_app

anthropic = pytest.importorskip("anthropic", reason="the test extras install anthropic")
jsonschema = pytest.importorskip("jsonschema", reason="the test extras install jsonschema")

KEY = "sk-ant-local"
GREEDY = {"temperature": 0}  # the SDK no longer has the argument; the API still takes it
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                            "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(default_model_file):
    server = Server(load(default_model_file), "smollm2", max_batch=4, max_seq_len=2048, api_key=KEY)
    with BackgroundServer(create_app(server)) as url:
        yield url, anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)


def test_a_reply_with_usage_and_stop_reasons(served):
    _, client = served
    r = client.messages.create(model="smollm2", max_tokens=40, messages=ASK, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.content[0].type == "text" and "Paris" in r.content[0].text
    assert r.stop_reason == "end_turn" and r.usage.output_tokens > 0
    counted = client.messages.count_tokens(model="smollm2", messages=ASK).input_tokens
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == counted
    cut = client.messages.create(model="smollm2", max_tokens=3, messages=ASK, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    # the same prompt again: all but its last token read from the KV cache, counted as Anthropic counts cache reads
    assert (cut.usage.cache_read_input_tokens, cut.usage.input_tokens) == (counted - 1, 1)
    stopped = client.messages.create(model="smollm2", max_tokens=40, messages=ASK, stop_sequences=["Paris"],
                                     extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert stopped.content[0].text == r.content[0].text[:r.content[0].text.index("Paris")]
    system = [{"type": "text", "text": "Answer in one word."}]  # replaces SmolLM2's default system prompt
    with_system = client.messages.create(model="smollm2", max_tokens=20, messages=ASK, extra_body=GREEDY, system=system)
    counted_system = client.messages.count_tokens(model="smollm2", messages=ASK, system=system).input_tokens
    assert with_system.usage.input_tokens + with_system.usage.cache_read_input_tokens == counted_system
    assert counted_system != r.usage.input_tokens + r.usage.cache_read_input_tokens


def test_streaming_events_equal_the_whole_reply(served):
    url, client = served
    whole = client.messages.create(model="smollm2", max_tokens=30, messages=ASK, extra_body=GREEDY)
    with client.messages.stream(model="smollm2", max_tokens=30, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens)
    raw = httpx.post(url + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "smollm2", "max_tokens": 5, "messages": ASK, "stream": True, **GREEDY}).text
    kinds = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"] and set(kinds[2:-3]) == {"content_block_delta"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip(served, stream):
    _, client = served
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    kw = dict(model="smollm2", max_tokens=100, tools=[WEATHER], extra_body=GREEDY)
    if stream:
        with client.messages.stream(messages=messages, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                    **kw) as s:
            r = s.get_final_message()
    else:
        r = client.messages.create(messages=messages, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   **kw)
    assert r.stop_reason == "tool_use"
    use = [b for b in r.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_weather" and use[0].id.startswith("toolu_")
    jsonschema.validate(use[0].input, WEATHER["input_schema"])
    assert use[0].input["city"] == "Paris"
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                               "content": json.dumps({"celsius": 21, "sky": "sunny"})}]}]
    answer = client.messages.create(messages=messages, **kw)
    assert answer.stop_reason == "end_turn" and ("21" in answer.content[0].text or "sunny" in answer.content[0].text)


def test_named_tool_and_tool_choice_errors(served):
    url, client = served
    r = client.messages.create(model="smollm2", max_tokens=100, tools=[WEATHER], extra_body=GREEDY,
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                               messages=[{"role": "user", "content": "Is it cold in Oslo?"}])
    assert [b.name for b in r.content if b.type == "tool_use"] == ["get_weather"]
    with pytest.raises(anthropic.BadRequestError, match="not in tools"):
        client.messages.create(model="smollm2", max_tokens=10, tools=[WEATHER], messages=ASK,
                               tool_choice={"type": "tool", "name": "nope"})


BAD = [  # (what, body or raw bytes, status, Anthropic error type, words)
    ("missing max_tokens", {"model": "smollm2", "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ("unknown model", {"model": "claude-9", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "claude-9"),
    ("malformed JSON", b'{"model": "smollm2", "max_tokens": ', 400, "invalid_request_error", "not valid JSON"),
    ("image block", {"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, 400,
     "invalid_request_error", "messages"),
    ("temperature above 1", {"model": "smollm2", "max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400,
     "invalid_request_error", "temperature"),
    ("tool_use in a user turn", {"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, 400, "invalid_request_error", "assistant"),
    ("unknown field", {"model": "smollm2", "max_tokens": 5, "messages": ASK, "thinking": {"type": "enabled"}}, 400,
     "invalid_request_error", "thinking"),
    ("over-long prompt", {"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": "w " * 200_000}]},
     400, "invalid_request_error", "context"),
]


@pytest.mark.parametrize("what,body,status,kind,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_anthropic_errors(served, what, body, status, kind, words):
    url, _ = served
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    r = httpx.post(url + "/v1/messages", headers=headers,
                   **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and words in error["error"]["message"], error


def test_the_api_key_in_either_header(served):
    url, _ = served
    body = {"model": "smollm2", "max_tokens": 2, "messages": ASK}
    assert httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.post(url + "/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=2, messages=ASK)


def test_models_in_anthropic_shape(served):
    url, client = served
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["smollm2"] and listed.data[0].type == "model"
    one = client.models.retrieve("smollm2")
    assert one.id == "smollm2" and one.max_input_tokens == 2048 and one.created_at.year >= 2026
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-3")
    assert httpx.get(url + "/v1/models", headers={"x-api-key": KEY}).json()["object"] == "list"  # OpenAI's without


def test_blocks_resent_as_the_sdk_dumps_them(served):
    """A client resends the SDK's own blocks with `block.model_dump()`: the SDK's bookkeeping fields
    (`caller`, `toolset_name`, None or set) are accepted; a field no SDK type defines is still refused."""
    url, client = served
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    kw = dict(model="smollm2", max_tokens=100, tools=[{**WEATHER, "type": "custom"}], extra_body=GREEDY)
    r = client.messages.create(messages=messages, tool_choice={"type": "any"}, **kw)
    use = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len({json.dumps(b.input) for b in use}) == len(use) >= 1
    dumped = [b.model_dump() for b in r.content]
    assert all("caller" in d and "toolset_name" in d for d in dumped if d["type"] == "tool_use")
    dumped[-1] = {**dumped[-1], "caller": {"type": "direct"}}
    messages += [{"role": "assistant", "content": dumped},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "toolset_name": None,
                                               "content": json.dumps({"celsius": 21})} for b in use]}]
    answer = client.messages.create(messages=messages, **kw)
    assert answer.stop_reason == "end_turn"
    messages[1]["content"][-1]["invented"] = 1
    bad = httpx.post(url + "/v1/messages", headers={"x-api-key": KEY},
                     json={"model": "smollm2", "max_tokens": 4, "messages": messages})
    assert bad.status_code == 400 and "invented" in bad.text
