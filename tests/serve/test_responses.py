"""OpenAI's Responses API driven by the official `openai` client (and raw HTTP for what it would not
send): replies and their status, the typed stream, stored responses and previous_response_id, a
function-call round trip, structured output, log-probabilities and truncation."""

import json

import httpx
import pytest
from pydantic import BaseModel

from llamalite.model.config import ModelConfig
from llamalite.formats.load import load
from llamalite.serve import BackgroundServer, Server, create_app
from llamalite.serve.guard import Limits
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

openai = pytest.importorskip("openai", reason="the test extras install openai")
jsonschema = pytest.importorskip("jsonschema", reason="the test extras install jsonschema")

ASK = "What is the capital of France?"
GREEDY = {"temperature": 0}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"], "additionalProperties": False}}


def test_a_reply_with_usage_and_status(client):
    r = client.responses.create(model="smollm2", input=ASK, max_output_tokens=40, **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and "Paris" in r.output_text
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens == client.responses.input_tokens.count(model="smollm2", input=ASK).input_tokens
    cut = client.responses.create(model="smollm2", input=ASK, max_output_tokens=3, **GREEDY)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and r.output_text.startswith(cut.output_text)
    # instructions are the system turn: they replace SmolLM2's default system prompt
    told = client.responses.create(model="smollm2", input=ASK, instructions="Answer in one word.", **GREEDY)
    assert told.instructions == "Answer in one word." and told.usage.input_tokens != r.usage.input_tokens
    as_items = client.responses.create(model="smollm2", max_output_tokens=40, **GREEDY, input=[
        {"role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    assert as_items.output_text == r.output_text


def test_the_stream_equals_the_whole_reply(client, served):
    whole = client.responses.create(model="smollm2", input=ASK, max_output_tokens=30, **GREEDY)
    with client.responses.stream(model="smollm2", input=ASK, max_output_tokens=30, **GREEDY) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == whole.output_text == final.output_text and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    raw = httpx.post(served[0] + "/v1/responses", json={"model": "smollm2", "input": ASK, "stream": True,
                                                        "max_output_tokens": 4, **GREEDY}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # four tokens of a longer answer
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == events[-4]["text"]


def test_previous_response_id_continues_the_stored_conversation(client):
    first = client.responses.create(model="smollm2", input=ASK, max_output_tokens=30, **GREEDY)
    follow = client.responses.create(model="smollm2", input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=30, **GREEDY)
    assert "Berlin" in follow.output_text and follow.previous_response_id == first.id
    # the same conversation sent whole gives the same prompt and the same greedy reply
    whole = client.responses.create(model="smollm2", max_output_tokens=30, **GREEDY, input=[
        {"role": "user", "content": ASK}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And of Germany?"}])
    assert whole.output_text == follow.output_text and whole.usage.input_tokens == follow.usage.input_tokens
    assert client.responses.retrieve(follow.id).output_text == follow.output_text
    items = client.responses.input_items.list(follow.id).data  # its own input, not the history before it
    assert [i.type for i in items] == ["message"] and items[0].content[0].text == "And of Germany?"
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError, match="store"):
        client.responses.retrieve(follow.id)
    unstored = client.responses.create(model="smollm2", input=ASK, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="smollm2", input="more", previous_response_id=unstored.id)
    assert "store: false" in e.value.message and e.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_round_trip(client, stream):
    kw = dict(model="smollm2", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **GREEDY)
    question = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    if stream:
        with client.responses.stream(input=question, **kw) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    else:
        r = client.responses.create(input=question, **kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    result = {"type": "function_call_output", "call_id": calls[0].call_id,
              "output": json.dumps({"temperature_c": 31, "sky": "sunny"})}
    # the client's own history (input + output + the result), as OpenAI's guide writes it ...
    answer = client.responses.create(model="smollm2", input=question + r.output + [result], tools=[WEATHER],
                                     max_output_tokens=60, **GREEDY)
    assert answer.status == "completed" and "31" in answer.output_text
    # ... or the stored one: the same prompt
    chained = client.responses.create(model="smollm2", previous_response_id=r.id, input=[result], tools=[WEATHER],
                                      max_output_tokens=60, **GREEDY)
    assert chained.output_text == answer.output_text and chained.usage.input_tokens == answer.usage.input_tokens


def test_text_format_json_schema_is_honoured(client):
    class City(BaseModel):
        name: str
        country: str
        population: int

    r = client.responses.parse(model="smollm2", input="Describe Paris as JSON.", text_format=City, **GREEDY)
    assert isinstance(r.output_parsed, City) and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), City.model_json_schema())
    obj = client.responses.create(model="smollm2", input="Describe Paris.", text={"format": {"type": "json_object"}},
                                  max_output_tokens=200, **GREEDY)
    assert isinstance(json.loads(obj.output_text), dict)


def test_output_logprobs_when_included(client):
    r = client.responses.create(model="smollm2", input=ASK, max_output_tokens=8, top_logprobs=3,
                                include=["message.output_text.logprobs"], **GREEDY)
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens and "".join(e.token for e in entries) == r.output_text
    for e in entries:  # greedy: each token is its own best alternative
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
    plain = client.responses.create(model="smollm2", input=ASK, max_output_tokens=8, **GREEDY)
    assert plain.output[0].content[0].logprobs is None


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model with ChatML and a context of 256, storing at most 2 responses."""
    ref = tiny_hf_model()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(Path(d) / "tiny.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(ref).items()}, cfg,
                          tensor_type="Q8_0")
        server = Server(load(path), "tiny", max_batch=2, limits=Limits.for_context(256, max_stored_responses=2))
    with BackgroundServer(create_app(server)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_the_store_evicts_the_oldest(tiny):
    ids = [tiny.responses.create(model="tiny", input=f"turn {i}", max_output_tokens=2).id for i in range(3)]
    with pytest.raises(openai.NotFoundError, match="keeps the last 2"):
        tiny.responses.retrieve(ids[0])
    assert [tiny.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_truncation_auto_drops_the_oldest_turns(tiny):
    turns = [{"role": role, "content": f"word {i} " * 12} for i in range(12) for role in ("user", "assistant")]
    turns.append({"role": "user", "content": "last"})
    with pytest.raises(openai.BadRequestError, match="context"):
        tiny.responses.create(model="tiny", input=turns, max_output_tokens=8)
    r = tiny.responses.create(model="tiny", input=turns, max_output_tokens=8, truncation="auto", instructions="sys")
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens + 8 <= 256 and r.truncation == "auto"
    # what was kept: the conversation from the earliest user turn at which it fits
    sizes = {k: tiny.responses.input_tokens.count(model="tiny", input=turns[k:], instructions="sys").input_tokens
             for k in range(0, len(turns), 2)}
    assert r.usage.input_tokens == sizes[min(k for k, n in sizes.items() if n + 8 <= 256)]
    assert sizes[0] + 8 > 256


BAD = [  # (what, body, status, words in the message)
    ("unknown model", {"model": "gpt-4", "input": "hi"}, 404, "does not exist"),
    ("an image part", {"model": "tiny", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400, "input_image"),
    ("a built-in tool", {"model": "tiny", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "web_search"),
    ("an item reference", {"model": "tiny", "input": [{"type": "item_reference", "id": "msg_1"}]}, 400,
     "function_call_output"),
    ("reasoning effort", {"model": "tiny", "input": "hi", "reasoning": {"effort": "high"}}, 400, "reasoning"),
    ("background", {"model": "tiny", "input": "hi", "background": True}, 400, "background"),
    ("verbosity", {"model": "tiny", "input": "hi", "text": {"verbosity": "high"}}, 400, "verbosity"),
    ("unknown field", {"model": "tiny", "input": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("max_output_tokens beyond the context", {"model": "tiny", "input": "hi", "max_output_tokens": 300}, 400,
     "max_output_tokens"),
    ("no input", {"model": "tiny"}, 400, "input"),
    ("input_text on an assistant turn", {"model": "tiny", "input": [{"role": "assistant", "content": [
        {"type": "input_text", "text": "x"}]}]}, 400, "output_text"),
    ("json_schema without a schema", {"model": "tiny", "input": "hi", "text": {"format": {"type": "json_schema"}}},
     400, "schema"),
    ("a schema that cannot compile", {"model": "tiny", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400, "schema"),
    ("missing previous response", {"model": "tiny", "input": "hi", "previous_response_id": "resp_nope"}, 404,
     "resp_nope"),
    ("temperature out of range", {"model": "tiny", "input": "hi", "temperature": 3}, 400, "temperature"),
    ("lone surrogate", b'{"model": "tiny", "input": "\\udc80"}', 400, "surrogate"),
    ("malformed JSON", b'{"model": "tiny", "input": ', 400, "not valid JSON"),
]


@pytest.mark.parametrize("what,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(tiny, what, body, status, words):
    url = str(tiny.base_url).rstrip("/") + "/responses"
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}) if isinstance(body, bytes) \
        else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text
    # still serving (greedy: a random model may sample an end token within two tokens)
    assert tiny.responses.create(model="tiny", input="still serving", max_output_tokens=2,
                                 temperature=0).status == "incomplete"
