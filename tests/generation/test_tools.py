"""Tool calling: the built-in formats (Hermes <tool_call> for ChatML models, Llama 3.1's JSON calls),
templates that handle tools themselves, replies parsed into calls, required and named calls
constrained to the functions' schemas, and a full tool loop with the official `openai` client."""

import json

import httpx
import pytest

from llamalite.text.chat_template import render_chat
from llamalite.formats.load import load
from llamalite.serve import BackgroundServer, Server, create_app
from llamalite.generation.tools import HERMES, LLAMA3_JSON, ToolStream, native_messages, tool_format
from tests.helpers import tiny_hf_model, train_bytelevel_bpe

jsonschema = pytest.importorskip("jsonschema", reason="the test extras install jsonschema")
openai = pytest.importorskip("openai", reason="the test extras install openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
    "additionalProperties": False}}}
NAMES = {"get_weather", "get_time"}

# ----- parsing recorded replies ---------------------------------------------------------------------------


def test_hermes_replies():
    content, calls = HERMES.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                                  NAMES)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    content, calls = HERMES.parse('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                  '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}'
                                  '</tool_call>', NAMES)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    for text in ("The weather is fine.", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "get_weather", "arguments": </tool_call>'):
        assert HERMES.parse(text, NAMES) == (text, [])  # not a call to a known function: content


def test_llama3_json_replies():
    content, calls = LLAMA3_JSON.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}', NAMES)
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    _, calls = LLAMA3_JSON.parse('{"name": "get_weather", "parameters": {"city": "A"}}; '
                                 '{"name": "get_time", "parameters": {"zone": "UTC"}}', NAMES)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    for text in ("It is sunny.", '{"answer": 42}', '{"name": "get_weather", "parameters": "x"}'):
        assert LLAMA3_JSON.parse(text, NAMES) == (text, [])


def test_a_streamed_reply_holds_back_only_what_may_open_a_call():
    split = ToolStream(HERMES, NAMES)
    sent = [split.push(t) for t in ["Let me ", "check. <tool", "_call>\n{\"name\": \"get_time\", ", "\"arguments\": "
                                    "{\"zone\": \"UTC\"}}\n</tool_call>"]]
    assert "".join(sent) == "Let me check. " and sent[1] == "check. "
    rest, calls = split.finish()
    assert rest == "" and calls[0].name == "get_time"
    plain = ToolStream(HERMES, NAMES)
    assert plain.push("a <to") == "a " and plain.push("ast> text") == "<toast> text" and plain.finish() == ("", [])
    llama = ToolStream(LLAMA3_JSON, NAMES)
    assert llama.push("  ") == "" and llama.push("Sure, 2 {x}") == "  Sure, 2 {x}" and llama.finish() == ("", [])


# ----- tiny random models with ChatML and Llama 3.1 templates -------------------------------------------

CHATML_TOOLS = (  # tools written by the template itself, Qwen 2.5's way (abridged)
    "{% if tools %}<|im_start|>system\n# Tools\n\nYou may call one or more functions.\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function call, return "
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for tc in m.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA31_TOOLS = (  # Llama 3.1's JSON tool calls written by the template (abridged from meta-llama's)
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.first and tools and m.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call.\n\n"
    "{% for t in tools %}{{ t | tojson }}\n\n{% endfor %}{{ m.content }}<|eot_id|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for tc in m.tool_calls %}{\"name\": \"{{ tc.function.name }}\", \"parameters\": "
    "{{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>"
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _tiny(tmp_path, specials, template, bos, eos):
    from tokenizers import AddedToken

    tok = train_bytelevel_bpe(400)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    model = tiny_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=2048)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": False}
    if template:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return load(tmp_path)


CASES = {  # name -> (specials, template, bos, eos, format, the template writes the tools)
    "chatml-template": (CHATML, CHATML_TOOLS, "<|im_start|>", "<|im_end|>", HERMES, True),
    "chatml-builtin": (CHATML, None, "<|im_start|>", "<|im_end|>", HERMES, False),
    "llama31-template": (LLAMA3, LLAMA31_TOOLS, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_JSON, True),
    "llama3-builtin": (LLAMA3, None, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_JSON, False),
}

HISTORY = [{"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": -3}"}]


@pytest.mark.parametrize("case", CASES)
def test_tools_and_tool_turns_reach_the_prompt(case, tmp_path):
    specials, template, bos, eos, fmt, native = CASES[case]
    lm = _tiny(tmp_path, specials, template, bos, eos)
    found, writes_tools = tool_format(lm.chat_template, lm.tokenizer)
    assert (found, writes_tools) == (fmt, native)
    if native:
        text = render_chat(lm.chat_template, lm.tokenizer, native_messages(HISTORY), tools=[WEATHER])
    else:
        text = render_chat(lm.chat_template, lm.tokenizer, fmt.prepare(HISTORY, [WEATHER]))
    assert '"name": "get_weather"' in text and "Get the current weather" in text  # the tool's description
    assert '"city": "Oslo"' in text and '{"celsius": -3}' in text  # the call and its result
    result_turn = "<tool_response>" if fmt is HERMES else "ipython"
    assert result_turn in text


@pytest.mark.parametrize("case", CASES)
def test_required_and_named_calls_match_the_schema_even_from_random_weights(case, tmp_path):
    specials, template, bos, eos, _, _ = CASES[case]
    server = Server(_tiny(tmp_path, specials, template, bos, eos), "tiny", max_batch=2, max_seq_len=2048)
    with BackgroundServer(create_app(server)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for choice, names in (("required", {"get_weather", "get_time"}),
                              ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                               tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False,
                                               temperature=1.0, seed=5, max_tokens=300)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0]
            assert call.function.name in names
            schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)


# ----- the default model: a full tool loop with the openai client ----------------------------------------

@pytest.fixture(scope="module")
def served(default_model_file):
    server = Server(load(default_model_file), "smollm2", max_batch=4, max_seq_len=2048)
    with BackgroundServer(create_app(server)) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_tool_loop(served, stream):
    """The model calls the function, the client runs it and sends the result back as a tool message, and the
    model answers with it."""
    _, client = served
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]

    def ask(**kw):
        if not stream:
            c = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], temperature=0,
                                               max_tokens=80, **kw).choices[0]
            return c.finish_reason, c.message.content, [(t.id, t.function.name, t.function.arguments)
                                                         for t in c.message.tool_calls or []]
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], temperature=0,
                                                    max_tokens=80, stream=True, **kw):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for d in choice.delta.tool_calls or []:  # OpenAI's deltas: id and name first, then arguments
                    entry = calls.setdefault(d.index, ["", "", ""])
                    entry[0] += d.id or ""
                    entry[1] += (d.function.name or "") if d.function else ""
                    entry[2] += (d.function.arguments or "") if d.function else ""
                finish = choice.finish_reason or finish
        return finish, content or None, [tuple(v) for _, v in sorted(calls.items())]

    finish, content, calls = ask(tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and len(calls) == 1
    call_id, name, arguments = calls[0]
    assert name == "get_weather" and json.loads(arguments)["city"] == "Paris" and call_id.startswith("call_")
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"celsius": 21, "sky": "sunny"})}]
    finish, content, calls = ask()
    assert finish == "stop" and not calls and "21" in content


def test_bad_tool_requests(served):
    url, _ = served
    base = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools",
         "parameters"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools", "together"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "pattern"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "function"),
    ]
    for extra, param, words in bad:
        r = httpx.post(url + "/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert (error["param"] or "").startswith(param) and words in error["message"], (extra, error)


def test_a_model_with_no_tool_format_says_so(tmp_path):
    from tests.helpers import save_hf_dir

    lm = load(save_hf_dir(tiny_hf_model(), tmp_path))  # no chat template, no ChatML or Llama 3 tokens
    server = Server(lm, "tiny", max_batch=1, max_seq_len=128)
    with BackgroundServer(create_app(server)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "tools": [WEATHER], "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no known tool-call format" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "tools": [WEATHER], "tool_choice": "none",
                                                            "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200  # "none": the tools change nothing, so nothing needs a format


# ----- what real clients send: open schemas, forced calls, cut replies (issue: defects with real clients) ---

def test_replies_cut_inside_a_call_and_repeated_calls():
    """A reply constrained to calls and cut by max_tokens keeps its complete calls and never shows the
    unfinished one as text; a call repeated exactly is dropped; the guard stops a reply at the repeat."""
    from llamalite.generation.tools import RepeatGuard

    paris = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    cut = paris + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "C'
    assert HERMES.parse(cut, NAMES, cut=True)[0] is None
    assert [c.name for c in HERMES.parse(cut, NAMES, cut=True)[1]] == ["get_weather"]
    assert HERMES.parse(paris[:40], NAMES, cut=True) == (None, [])
    split = ToolStream(HERMES, NAMES, calls_only=True)
    assert split.push(cut) == "" and [c.name for c in split.finish()[1]] == ["get_weather"]
    alone = ToolStream(HERMES, NAMES, calls_only=True)
    alone.push(paris[:-2])
    assert alone.finish() == ("", [])  # was the markup, as content
    assert [c.name for c in HERMES.parse(paris + "\n" + paris, NAMES)[1]] == ["get_weather"]
    guard = RepeatGuard(HERMES, NAMES)
    assert not any(guard(piece) for piece in (paris[:30], paris[30:], "\n", paris[:30]))
    assert guard(paris[30:])
    llama = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert [c.name for c in LLAMA3_JSON.parse(llama + '; {"name": "get_ti', NAMES, cut=True)[1]] == ["get_weather"]
    assert LLAMA3_JSON.repeats(llama + "; " + llama, NAMES) and not LLAMA3_JSON.repeats(llama, NAMES)


def test_open_object_schemas_admit_their_declared_keys_only(default_model_file):
    """What pydantic, LangChain and instructor send leaves additionalProperties out: the grammar then admits
    the declared keys only (as llama.cpp's converter), unless the schema says otherwise; keys that add up
    across allOf stay open."""
    from pydantic import BaseModel

    from llamalite.generation.constrain import Grammar, GrammarError, _prepared
    from llamalite.formats.load import load_tokenizer

    class Place(BaseModel):
        name: str
        country: str

    class Trip(BaseModel):
        place: Place
        days: int

    tokenizer = load_tokenizer(default_model_file)

    def accepts(schema, text):
        matcher = Grammar.json_schema(tokenizer, schema).matcher()
        try:
            for token in tokenizer.encode(text, add_bos=False, parse_special=False):
                matcher.advance(token)
        except GrammarError:
            return False
        return True

    schema = Trip.model_json_schema()
    assert "additionalProperties" not in json.dumps(schema)
    assert accepts(schema, '{"place": {"name": "Rome", "country": "Italy"}, "days": 3}')
    assert not accepts(schema, '{"place": {"name": "Rome", "country": "Italy"}, "days": 3, "cost"')
    assert not accepts(schema, '{"place": {"name": "Rome", "country": "Italy", "population"')
    assert accepts({**schema, "additionalProperties": True}, '{"place": {"name": "R", "country": "I"}, "days": 3, "x"')
    split = {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                       {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert accepts(split, '{"a": 1, "b": 2}')
    assert _prepared({"type": "object"}) == {"type": "object"}  # json_object: any object


def test_strict_schemas_are_checked_as_openai_defines_them():
    from llamalite.generation.constrain import strict_problem

    closed = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert strict_problem(closed) is None
    assert "additionalProperties" in strict_problem({**closed, "additionalProperties": True})
    assert "missing 'a'" in strict_problem({**closed, "required": []})
    nested = {**closed, "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    assert strict_problem(nested).startswith("schema.properties.a:")


CITY_PROMPT = [{"role": "user", "content": "Give the name, country and population of the capital of France as JSON."}]


def test_open_schemas_from_pydantic_and_langchain_end_with_the_object(served):
    """Through the openai SDK at temperature 0: a pydantic model's schema as response_format, and LangChain's
    conversion of a tool called by force, come back as the object, closed, finish "stop"/"tool_calls"
    (the model once wrote invented keys until max_tokens)."""
    from pydantic import BaseModel

    _, client = served

    class City(BaseModel):
        """A city."""
        name: str
        country: str
        population: int

    c = client.chat.completions.create(model="smollm2", messages=CITY_PROMPT, temperature=0, max_tokens=200,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "City", "schema": City.model_json_schema()}}).choices[0]
    assert c.finish_reason == "stop", c.message.content
    assert set(json.loads(c.message.content)) == {"name", "country", "population"}
    convert = pytest.importorskip("langchain_core.utils.function_calling").convert_to_openai_tool
    tool = convert(City)
    assert "additionalProperties" not in json.dumps(tool)
    c = client.chat.completions.create(model="smollm2", messages=CITY_PROMPT, temperature=0, max_tokens=200,
                                       tools=[tool], tool_choice="required").choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert set(json.loads(c.message.tool_calls[0].function.arguments)) == {"name", "country", "population"}


def test_a_named_or_required_call_does_not_repeat(served):
    """A named tool choice gives exactly one call; with "required" and parallel calls allowed (the default), a
    call that repeats an earlier one ends the reply (the model once repeated it until max_tokens)."""
    url, _ = served
    base = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the weather like in Paris?"}],
            "tools": [WEATHER], "temperature": 0, "max_tokens": 200}
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={**base, "tool_choice": choice, "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
                names = [d["function"]["name"] for e in events for c in e["choices"]
                         for d in c["delta"].get("tool_calls") or [] if d.get("function", {}).get("name")]
                content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
                arguments = [d["function"]["arguments"] for e in events for c in e["choices"]
                             for d in c["delta"].get("tool_calls") or [] if d.get("function", {}).get("arguments")]
            else:
                message = r.json()["choices"][0]["message"]
                finish = [r.json()["choices"][0]["finish_reason"]]
                names = [t["function"]["name"] for t in message.get("tool_calls") or []]
                arguments = [t["function"]["arguments"] for t in message.get("tool_calls") or []]
                content = message["content"] or ""
            assert finish == ["tool_calls"] and content == "", (choice, stream, r.text[-500:])
            calls = list(zip(names, arguments))
            assert calls and len(set(calls)) == len(calls), calls
            if isinstance(choice, dict):
                assert len(calls) == 1


def test_a_constrained_reply_cut_by_max_tokens_has_no_call_text(served):
    url, client = served
    base = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the weather like in Paris?"}],
            "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "max_tokens": 8}
    c = client.chat.completions.create(**base).choices[0]
    assert c.finish_reason == "length" and not c.message.content and not c.message.tool_calls
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**base, stream=True)
                   if ch.choices)
    assert text == ""
    r = httpx.post(url + "/v1/responses", json={"model": "smollm2", "input": "What is the weather like in Paris?",
                                                "tools": [{"type": "function", **WEATHER["function"]}],
                                                "tool_choice": "required", "max_output_tokens": 8})
    assert r.status_code == 200 and r.json()["status"] == "incomplete"
    assert all(item["type"] != "message" for item in r.json()["output"]), r.json()["output"]


def test_strict_schemas_that_are_not_closed_are_refused(served):
    url, _ = served
    base = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    open_params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    bad = [({"tools": [{"type": "function", "function": {"name": "f", "parameters": open_params, "strict": True}}]},
            "tools", "additionalProperties"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": open_params,
                                                                       "strict": True}}},
            "response_format", "additionalProperties")]
    for extra, param, words in bad:
        r = httpx.post(url + "/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
    ok = {**open_params, "additionalProperties": False}
    r = httpx.post(url + "/v1/chat/completions", json={**base, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": ok, "strict": True}}})
    assert r.status_code == 200, r.text
