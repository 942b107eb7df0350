"""Constrained decoding: JSON schemas and grammars as per-step masks, in generate(), the engine and the
server (driven by the official `openai` client), checked with `jsonschema`."""

import json

import httpx
import pytest
import torch

from llamalite.text.chat_template import encode_chat
from llamalite.generation.constrain import Grammar, GrammarError
from llamalite.generation.tokens import generate
from llamalite.formats.load import load
from llamalite.generation.sampling import GREEDY, SamplingParams
from llamalite.serve.engine import Engine, Request, TokenEvent

jsonschema = pytest.importorskip("jsonschema", reason="the test extras install jsonschema")
openai = pytest.importorskip("openai", reason="the test extras install openai")

MODEL = "smollm2"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}}
ASK = "Describe a person called Ann, aged 30, who likes chess, as JSON."


def _prompt(lm, text=ASK):
    return encode_chat(lm.chat_template, lm.tokenizer, [{"role": "user", "content": text}])


def test_greedy_json_schema_output_validates(default_lm):
    tok = default_lm.tokenizer
    matcher = Grammar.json_schema(tok, PERSON).matcher()
    tokens = list(generate(default_lm.model, _prompt(default_lm), max_new_tokens=200, sampling=GREEDY,
                           stop_ids=tok.end_ids, constraint=matcher))
    value = json.loads(tok.decode(tokens))
    jsonschema.validate(value, PERSON)
    assert matcher.done and value["name"] == "Ann"


def test_every_masked_token_is_allowed_and_the_rest_are_not(default_lm):
    """The mask is built from the model's own vocabulary: each allowed token's bytes keep the text a
    prefix of some valid JSON, checked here against a brute-force reading of the allowed set."""
    tok = default_lm.tokenizer
    matcher = Grammar.json_schema(tok, {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                        "required": ["ok"], "additionalProperties": False}).matcher()
    allowed = matcher.allowed()
    first = {tok.token_bytes()[i] for i in allowed.nonzero().flatten().tolist()}
    assert first and all(b.lstrip(b" \n\t").startswith(b"{") or b.strip() == b"" for b in first)
    logits = torch.zeros(tok.vocab_size)
    masked = matcher.mask(logits)
    assert torch.isinf(masked[~allowed]).all() and (masked[allowed] == 0).all()


def test_bounded_whitespace_even_when_the_model_wants_only_blanks(default_lm):
    """A logit bias that makes newlines and spaces all but certain: without the grammar's bound the
    reply would be blanks to max_tokens; with it, a valid object well within the budget."""
    tok = default_lm.tokenizer
    blanks = [i for i, b in enumerate(tok.token_bytes()) if b and not b.strip(b" \n\t")]
    bias = SamplingParams(temperature=0, logit_bias=tuple((i, 100.0) for i in blanks))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    gen = generate(default_lm.model, _prompt(default_lm, "Is the sky blue? Answer as JSON."), max_new_tokens=200,
                   sampling=bias, stop_ids=tok.end_ids, constraint=Grammar.json_schema(tok, schema).matcher())
    tokens = []
    try:
        while True:
            tokens.append(next(gen))
    except StopIteration as done:
        reason = done.value
    assert reason == "stop" and len(tokens) < 200
    jsonschema.validate(json.loads(tok.decode(tokens)), schema)
    free = list(generate(default_lm.model, _prompt(default_lm, "Is the sky blue? Answer as JSON."), max_new_tokens=20,
                         sampling=bias, stop_ids=tok.end_ids))
    assert not tok.decode(free).strip()  # what the bias does unconstrained


def test_unbounded_integers_are_bounded_and_annotations_left_out(default_lm):
    from llamalite.generation.constrain import SAFE_INTEGERS, _prepared

    schema = {"type": "object", "x-order": 1, "properties": {
        "n": {"type": "integer", "x-ui": "slider"}, "m": {"type": ["integer", "null"], "maximum": 5},
        "c": {"const": {"type": "integer", "x": 1}}, "x-order": {"type": "string"}},
        "$defs": {"d": {"items": [{"type": "integer"}], "foo": 2}}}
    out = _prepared(schema)
    assert (out["properties"]["n"]["minimum"], out["properties"]["n"]["maximum"]) == SAFE_INTEGERS
    assert "minimum" not in out["properties"]["m"] and out["properties"]["c"] == {"const": {"type": "integer", "x": 1}}
    assert "x-order" not in out and "x-ui" not in out["properties"]["n"] and "x-order" in out["properties"]
    assert out["$defs"]["d"] == {"items": [{"type": "integer", "minimum": SAFE_INTEGERS[0], "maximum": SAFE_INTEGERS[1]}]}
    assert schema["properties"]["n"] == {"type": "integer", "x-ui": "slider"}  # the caller's schema is left alone
    Grammar.json_schema(default_lm.tokenizer, schema)  # compiles: the annotations constrain nothing
    with pytest.raises(GrammarError, match="uniqueItems"):  # a keyword it cannot enforce is still refused
        Grammar.json_schema(default_lm.tokenizer, {"type": "array", "uniqueItems": True})


def test_gbnf_and_lark_grammars(default_lm):
    tok = default_lm.tokenizer
    for grammar in (Grammar.gbnf(tok, 'root ::= ("yes" | "no") "."'), Grammar.lark(tok, 'start: ("yes" | "no") "."')):
        tokens = list(generate(default_lm.model, _prompt(default_lm, "Is Paris in France?"), max_new_tokens=10,
                               sampling=SamplingParams(temperature=1.0), stop_ids=tok.end_ids,
                               generator=torch.Generator().manual_seed(3), constraint=grammar.matcher()))
        assert tok.decode(tokens) in ("yes.", "no.")
    with pytest.raises(GrammarError, match="GBNF"):
        Grammar.gbnf(tok, "root ::= missing")
    with pytest.raises(GrammarError, match="strin"):
        Grammar.json_schema(tok, {"type": "strin"})


def test_constrained_greedy_rows_are_the_same_alone_or_batched_with_free_ones(default_model_file):
    lm = load(default_model_file)
    tok = lm.tokenizer
    engine = Engine(lm.model, max_batch=4, max_seq_len=512)
    grammar = Grammar.json_schema(tok, PERSON)
    prompts = [_prompt(lm), _prompt(lm, "Name three colors."), _prompt(lm, "Describe Bob, 41, a sailor, as JSON."),
               _prompt(lm, "What is 2+2?")]

    def run(indices):
        requests = [engine.submit(Request(prompts[i], max_tokens=120, stop_ids=tok.end_ids,
                                          constraint=grammar.matcher() if i % 2 == 0 else None)) for i in indices]
        while engine.active or engine.waiting:
            engine.step()
        return [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests]

    solo = [run([i])[0] for i in range(4)]
    together = run(range(4))
    assert together == solo and engine.stats["largest_batch"] == 4
    for i in (0, 2):
        jsonschema.validate(json.loads(tok.decode(solo[i])), PERSON)


# ----- the server -------------------------------------------------------------------------------------

def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris."}],
                                      response_format=City, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.parsed.name == "Paris"


def test_json_schema_is_valid_at_temperature_1_over_50_seeds(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    replies = []
    for seed in range(0, 50, 10):  # choice i is seeded with seed + i: 50 seeds
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], n=10, seed=seed,
                                           temperature=1.0, max_tokens=300, response_format=fmt)
        replies += [(c.finish_reason, c.message.content) for c in r.choices]
    assert len(replies) == 50 and len({text for _, text in replies}) > 10
    for finish, text in replies:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_streamed_and_cut_by_max_tokens(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France? Reply with a JSON object "
                                                                "with the key capital."}],
              temperature=0, response_format={"type": "json_object"})
    chunks = list(client.chat.completions.create(stream=True, max_tokens=300, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict), text
    cut = client.chat.completions.create(max_tokens=5, **kw).choices[0]
    assert cut.finish_reason == "length" and cut.message.content.startswith("{")


def test_llama_cpp_grammar_and_json_schema_fields(client):
    r = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                  extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], temperature=0,
                                       max_tokens=200, extra_body={"json_schema": PERSON})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_logit_bias(client, served):
    tok = served[1].tokenizer
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    best = client.completions.create(**kw).choices[0].text
    best_id = tok.encode(best, add_bos=False)[0]
    banned = client.completions.create(logit_bias={str(best_id): -100}, **kw).choices[0].text
    assert banned != best
    forced_id = tok.encode(" banana", add_bos=False)[0]
    forced = client.completions.create(logit_bias={str(forced_id): 100}, **kw).choices[0].text
    assert forced == tok.decode([forced_id])


BAD = [  # (what, body, param, words)
    ("invalid schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                   "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ("json_schema without its schema", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("bad GBNF", {"grammar": "root ::= nowhere"}, "grammar", "nowhere"),
    ("two constraints", {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "one of"),
    ("logit_bias outside the vocabulary", {"logit_bias": {"99999999": 5}}, "logit_bias", "token id"),
    ("logit_bias not an id", {"logit_bias": {"hello": 5}}, "logit_bias", "pattern"),
    ("unknown field in response_format", {"response_format": {"type": "json_object", "schema": {}}},
     "response_format.schema", "not supported"),
    ("logit_bias out of range", {"logit_bias": {"5": 500}}, "logit_bias", "100"),
    ("unknown field functions", {"functions": [{"name": "f"}]}, "functions", "not supported"),
    ("unknown field suffix", {"suffix": "end"}, "suffix", "not supported"),
]


@pytest.mark.parametrize("what,extra,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_get_a_400_naming_the_parameter(served, what, extra, param, words):
    url, _ = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower() and (error["param"] or "").startswith(param), error
    assert httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 200  # still serving


def test_harmless_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="u1", metadata={"k": "v"}, store=False)
    assert r.choices[0].message.content is not None


def test_cli_generate_and_chat_with_constraints(capsys, tmp_path, monkeypatch):
    import io
    import sys

    from llamalite.cli.main import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    assert main(["generate", "--chat", "--temperature", "0", "--json-schema", str(schema), ASK]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    grammar = tmp_path / "yn.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    assert main(["generate", "--chat", "--seed", "1", "--grammar", str(grammar), "Is Paris in France?"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a fruit.\nName a color.\n"))
    assert main(["chat", "--temperature", "0", "--json", "--max-new-tokens", "80"]) == 0
    out, replies, decoder = capsys.readouterr().out.strip(), [], json.JSONDecoder()
    while out:  # each reply one JSON object (replies may span lines)
        value, end = decoder.raw_decode(out)
        replies.append(value)
        out = out[end:].strip()
    assert len(replies) == 2 and all(isinstance(r, dict) for r in replies)
    assert main(["generate", "--json", "--grammar", str(grammar), "x"]) == 1
    assert "not several" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel-bpe", "default-model"])
def test_masks_from_every_tokenizer_kind_only_ever_allow_valid_json(kind, tmp_path, default_lm):
    """A random walk through the allowed tokens (a model that picks uniformly among them) always spells
    JSON that validates: each token's bytes are read right, for SentencePiece ("\u2581", byte fallback) and
    byte-level BPE alike."""
    from llamalite.text.tokenizer import tokenizer_from_hf_dir, tokenizer_from_model_file
    from tests.helpers import train_bytelevel_bpe, train_sentencepiece

    if kind == "sentencepiece":
        tok = tokenizer_from_model_file(train_sentencepiece(tmp_path / "tokenizer.model"))
    elif kind == "bytelevel-bpe":
        train_bytelevel_bpe(400).save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        tok = tokenizer_from_hf_dir(tmp_path)
    else:
        tok = default_lm.tokenizer
    schema = {"type": "object", "additionalProperties": False, "required": ["word", "n", "flag"],
              "properties": {"word": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "maximum": 999},
                             "flag": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["x", "yz"]},
                                                                    "maxItems": 2}}}
    grammar, pieces = Grammar.json_schema(tok, schema), tok.token_bytes()
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        matcher, tokens = grammar.matcher(), []
        while not matcher.done:
            allowed = matcher.allowed().nonzero().flatten()
            allowed = allowed[~torch.isin(allowed, torch.tensor(sorted(tok.end_ids)))]  # ends only when complete
            if not len(allowed):
                break  # complete: only an end token may follow
            token = int(allowed[torch.randint(len(allowed), (1,), generator=rng)])
            matcher.advance(token)
            tokens.append(token)
            assert len(tokens) < 400
        jsonschema.validate(json.loads(b"".join(pieces[t] for t in tokens)), schema)


def test_constraints_keep_logprobs_stop_strings_and_prefix_reuse(served, client):
    """Logprobs under a mask are finite (the ruled-out tokens are no alternatives), stop strings still cut,
    and a resent conversation still reuses its cached prefix."""
    url, _ = served
    body = {"model": MODEL, "prompt": "A JSON object describing a dog:", "max_tokens": 30, "temperature": 0,
            "logprobs": 5, "response_format": {"type": "json_object"}}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200
    lp = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the response"))["choices"][0]["logprobs"]
    assert lp["tokens"][0].lstrip().startswith("{") and all(x <= 0 for x in lp["token_logprobs"])
    assert all(len(top) >= 1 for top in lp["top_logprobs"])
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], temperature=0,
                                          max_tokens=200, response_format={"type": "json_schema", "json_schema": {
                                              "name": "p", "schema": PERSON}}).choices[0].message.content
    cut = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], temperature=0,
                                         max_tokens=200, stop=['"age"'], response_format={
                                             "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:full.index('"age"')]
    assert cut.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix came from the cache
