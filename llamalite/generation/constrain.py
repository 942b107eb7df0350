"""Constrained decoding: a JSON schema or a grammar becomes, at every step, a mask over the vocabulary
that is applied to one sequence's logits before sampling, so the text produced always parses.

The grammar engine is llguidance (Microsoft's; llama.cpp and vLLM use it), chosen over xgrammar (vLLM's
and SGLang's default) by measurement on the default model (`benchmarks/bench_grammar.py --engines`,
figures in BENCHMARKS.md):
- speed: along the same 256-token reply, a mask took a median 8 us with llguidance, 15 us with
  xgrammar (a decode step is about 2,700 us); compiling the schema took 0.9 ms against 12 ms.
  xgrammar builds its view of the vocabulary faster (0.02 s against 0.3 s, once per model);
- coverage: both compile the schemas apps send (objects, enums, anyOf/oneOf, $ref, patterns,
  formats, length and item bounds, tuples); for keywords a grammar cannot enforce (uniqueItems, not,
  if/then/else, dependentRequired) llguidance refuses with an error naming them, while xgrammar
  compiles them without a word (a context-free grammar cannot hold uniqueItems or not), so a reply
  could break the schema under a 200. llguidance also reads GBNF (llama.cpp's
  `grammar` field), Lark and regular expressions;
- weight: llguidance is one wheel with no dependencies; xgrammar requires transformers, triton and
  a tensor runtime.

A `Grammar` is compiled once per request; each sequence (each choice of `n`) gets its own `Matcher`,
whose state advances with every token the sequence takes. The mask is built from the model's own
tokenizer (every token's bytes, byte-level BPE and SentencePiece alike), so any tokenization of the
allowed text is allowed, not only the canonical one.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np
import torch

from ..text.tokenizer import Tokenizer

# Whitespace allowed between JSON tokens: nothing, one space, or a newline and up to 20 spaces or tabs of
# indent (llama.cpp's json-schema-to-grammar uses the same bound). Unbounded whitespace lets a small
# model spend its whole max_tokens on blanks.
JSON_WHITESPACE = r"(?:[ ]|\n[ \t]{0,20})?"


SAFE_INTEGERS = (-(2 ** 53), 2 ** 53)  # exact in every JSON parser (IEEE doubles), JavaScript's included

# JSON Schema's own keywords (2020-12, with draft-07's definitions and tuple items), by what their value is.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}  # name -> schema
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMAS = {"items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
            "contains", "propertyNames", "not", "if", "then", "else"}
_VALUES = {"type", "enum", "const", "default", "examples", "format", "pattern", "minimum", "maximum",
           "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "minItems", "maxItems",
           "uniqueItems", "minContains", "maxContains", "minProperties", "maxProperties", "required",
           "dependentRequired", "dependencies", "title", "description", "$schema", "$id", "$ref", "$anchor",
           "$dynamicRef", "$dynamicAnchor", "$comment", "$vocabulary", "deprecated", "readOnly", "writeOnly",
           "contentEncoding", "contentMediaType", "contentSchema", "x-guidance"}


def _prepared(schema: Any, merged: bool = False) -> Any:
    """The schema as the grammar engine gets it:
    - keywords JSON Schema does not define (`x-order`, an app's own annotations) are left out: the
      specification makes them annotations, which constrain nothing. Its own keywords all stay, so one
      the engine cannot enforce (uniqueItems, not, ...) is still refused by name;
    - every integer without bounds is bounded to +-2^53, the integers that every JSON parser reads
      exactly: an unbounded integer lets a small model loop on digits ("population": 1111...) until
      max_tokens;
    - an object schema that declares `properties` but says nothing of `additionalProperties` admits
      its declared keys only, as llama.cpp's json-schema-to-grammar generates: what pydantic,
      LangChain, instructor and `llm --schema` send leaves the keyword out, and a small model given
      the freedom invents keys until max_tokens. A schema that allows more says so (`true` or a
      schema, or `patternProperties`). Where keys add up (the branches of an allOf of several schemas,
      and an object with properties of its own beside allOf/anyOf/oneOf: `merged`), nothing is closed:
      closing each part would refuse the keys the others declare."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    composed = {"allOf", "anyOf", "oneOf"} & schema.keys()
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _prepared(v) for name, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list) or key == "items" and isinstance(value, list):
            adds_up = key == "allOf" and len(value) > 1 or key in composed and "properties" in schema
            out[key] = [_prepared(v, merged=adds_up) for v in value]
        elif key in _SCHEMAS:
            out[key] = _prepared(value)
        elif key in _VALUES:
            out[key] = value
    kind = out.get("type")
    if (kind == "integer" or isinstance(kind, list) and "integer" in kind) and \
            not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & out.keys():
        out["minimum"], out["maximum"] = SAFE_INTEGERS
    if "properties" in out and not merged and not composed and \
            not {"additionalProperties", "unevaluatedProperties", "patternProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def strict_problem(schema: Any, where: str = "schema") -> str | None:
    """Why `schema` is not a strict schema as OpenAI's Structured Outputs defines one, or None: every
    object must set `additionalProperties` to false and list each of its properties in `required`
    (an optional field is a type that admits null). The message names the place, as a JSON path."""
    if isinstance(schema, list):
        for k, item in enumerate(schema):
            if (problem := strict_problem(item, f"{where}[{k}]")) is not None:
                return problem
        return None
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind == "object" or isinstance(kind, list) and "object" in kind or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return f"{where}: 'additionalProperties' must be given and be false in a strict schema"
        missing = [name for name in schema.get("properties", {}) if name not in schema.get("required", [])]
        if missing:
            return (f"{where}: 'required' must list every key in properties in a strict schema; missing "
                    f"'{missing[0]}' (make an optional field's type admit null instead)")
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                if (problem := strict_problem(sub, f"{where}.{key}.{name}")) is not None:
                    return problem
        elif key in _SCHEMA_LISTS or key in _SCHEMAS:
            if (problem := strict_problem(value, f"{where}.{key}")) is not None:
                return problem
    return None


JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": JSON_WHITESPACE}


def json_lark(schema: dict[str, Any] | bool) -> str:
    """A Lark terminal (llguidance's %json) for JSON matching `schema`, prepared as Grammar.json_schema does."""
    prepared = _prepared(schema)
    if isinstance(prepared, dict):
        prepared = {**prepared, "x-guidance": JSON_OPTIONS}
    return "%json " + json.dumps(prepared, separators=(",", ":"))


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile; the message says why."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("constrained decoding needs llguidance: pip install llguidance") from e
    return llguidance


_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of our tokenizer (built once per tokenizer: 0.2-0.3 s for the default model's 49k tokens)."""
    if tokenizer not in _TOKENIZERS:
        llg = _llguidance()

        class Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id = next(iter(sorted(tokenizer.end_ids)), tokenizer.eos_id)
            bos_token_id = tokenizer.bos_id
            tokens = tokenizer.token_bytes()
            special_token_ids: list[int] = []  # marked in `tokens` already, by their 0xFF byte

            def __call__(self, text: str) -> list[int]:
                return tokenizer.encode_continuation(text)

        _TOKENIZERS[tokenizer] = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()), n_vocab=tokenizer.vocab_size,
                                                 eos_token=sorted(tokenizer.end_ids) or None)
    return _TOKENIZERS[tokenizer]


class Grammar:
    """A compiled constraint for one tokenizer; `matcher()` starts a sequence under it."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, what: str):
        llg = _llguidance()
        self.tokenizer, self.what = tokenizer, what
        self.vocab_size = tokenizer.vocab_size
        self._template = llg.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self._template.is_error():
            raise GrammarError(f"the {what} cannot be used: {self._template.get_error()}")

    @classmethod
    def json_schema(cls, tokenizer: Tokenizer, schema: dict[str, Any] | bool) -> "Grammar":
        """JSON matching `schema` (a JSON Schema); {"type": "object"} is any JSON object."""
        llg = _llguidance()
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the JSON schema must be an object")
        try:
            text = llg.LLMatcher.grammar_from_json_schema(json.dumps(_prepared(schema)), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        return cls(tokenizer, text, "JSON schema")

    @classmethod
    def lark(cls, tokenizer: Tokenizer, source: str) -> "Grammar":
        """A grammar in Lark's syntax (llguidance's own; `start` is the start). `json_lark(schema)`
        writes a JSON-schema terminal for one, with the same bounds as `json_schema`."""
        return cls(tokenizer, _llguidance().LLMatcher.grammar_from_lark(source), "Lark grammar")

    @classmethod
    def gbnf(cls, tokenizer: Tokenizer, source: str) -> "Grammar":
        """A grammar in llama.cpp's GBNF (its `root` rule is the start)."""
        llg = _llguidance()
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(source)
        except Exception as e:  # noqa: BLE001 (the converter raises assorted errors on bad input)
            raise GrammarError(f"the GBNF grammar cannot be used: {e}") from None
        return cls(tokenizer, llg.LLMatcher.grammar_from_lark(lark), "GBNF grammar")

    def matcher(self) -> "Matcher":
        return Matcher(self._template.deep_copy(), self.vocab_size, self.what)


class Matcher:
    """One sequence's place in a grammar: `mask` the next logits, then `advance` with the token taken."""

    def __init__(self, matcher: Any, vocab_size: int, what: str):
        self._m, self.vocab_size, self.what = matcher, vocab_size, what

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar forbids at -inf (a new tensor; the input is untouched)."""
        allowed = self.allowed().to(logits.device)
        if logits.shape[-1] > allowed.shape[0]:  # rows past the tokenizer's vocabulary (padding) are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GrammarError(f"the {self.what} rejected token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (only an end token)."""
        return self._m.is_stopped()
