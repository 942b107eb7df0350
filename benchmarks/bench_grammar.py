"""Constrained decoding on the default model: what a JSON-schema constraint costs, and the two grammar
engines the field trusts side by side.

    python benchmarks/bench_grammar.py [--tokens 128] [--repeats 5] [--threads 2] [--engines]

1. Decode rate with a JSON-schema constraint against without, alternating, in one process: greedy
   replies to the same chat prompt, tokens per second of the decode loop (prefill excluded), medians
   of --repeats. Target: >= 0.9x.
2. With --engines (needs `pip install --no-deps xgrammar apache-tvm-ffi`, and transformers): llguidance
   against xgrammar on the same vocabulary: the time to compile each schema, the time to compute one
   token's mask along the same token sequence, and which of a set of schemas (the keywords apps send)
   each one accepts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies", "bio"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "city": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}},
                         "bio": {"type": "string"}}}
PROMPT = ("Invent a person and describe them as JSON with their name, age, city, hobbies and a long biography of "
          "several sentences.")

COVERAGE = {  # name -> schema: the keywords apps and SDKs send (pydantic, zod, OpenAI's strict mode)
    "object, required, additionalProperties": SCHEMA,
    "enum and const": {"type": "object", "properties": {"kind": {"enum": ["a", "b", 3]}, "v": {"const": "x"}}},
    "anyOf / nullable": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "$defs and $ref (recursive)": {"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"},
    "string pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "string format date-time": {"type": "string", "format": "date-time"},
    "string format email": {"type": "string", "format": "email"},
    "min/maxLength": {"type": "string", "minLength": 2, "maxLength": 8},
    "min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "prefixItems (tuples)": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]},
    "number bounds": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 10},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                        {"required": ["a"]}]},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "type list": {"type": ["string", "integer"]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if / then / else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "minProperties": {"type": "object", "minProperties": 2},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
}


def decode_rates(lm, tokens: int, repeats: int) -> dict:
    import torch

    from llamalite.text.chat_template import encode_chat
    from llamalite.generation.constrain import Grammar
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    tok = lm.tokenizer
    prompt = encode_chat(lm.chat_template, tok, [{"role": "user", "content": PROMPT}])
    grammar = Grammar.json_schema(tok, SCHEMA)

    def rate(constrained: bool) -> tuple[float, int]:
        gen = generate(lm.model, prompt, max_new_tokens=tokens, sampling=GREEDY, stop_ids=tok.end_ids,
                       constraint=grammar.matcher() if constrained else None)
        next(gen)  # the prefill and the first token: not decode
        t, n = time.perf_counter(), 0
        for _ in gen:
            n += 1
        return n / (time.perf_counter() - t), n

    rate(True), rate(False)  # warm-up
    free, constrained, lengths = [], [], []
    for _ in range(repeats):
        free.append(rate(False)[0])
        r, n = rate(True)
        constrained.append(r)
        lengths.append(n)
    f, c = statistics.median(free), statistics.median(constrained)
    del torch
    return {"free_tok_s": round(f, 1), "json_schema_tok_s": round(c, 1), "ratio": round(c / f, 3),
            "free_min_max": [round(min(free), 1), round(max(free), 1)],
            "json_schema_min_max": [round(min(constrained), 1), round(max(constrained), 1)],
            "constrained_tokens": lengths[0]}


def engines(lm) -> dict:
    import numpy as np
    import xgrammar as xgr

    from llamalite.text.chat_template import encode_chat
    from llamalite.generation.constrain import Grammar, GrammarError
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    tok = lm.tokenizer
    vocab = tok.token_bytes()
    t = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.end_ids))
    compiler = xgr.GrammarCompiler(info)
    xgr_setup = time.perf_counter() - t
    from llamalite.generation import constrain

    constrain._TOKENIZERS.clear()  # measure building llguidance's view of the vocabulary too
    t = time.perf_counter()
    constrain.ll_tokenizer(tok)
    llg_setup = time.perf_counter() - t

    # The same token sequence through both: llguidance's greedy constrained reply.
    prompt = encode_chat(lm.chat_template, tok, [{"role": "user", "content": PROMPT}])
    grammar = Grammar.json_schema(tok, SCHEMA)
    sequence = list(generate(lm.model, prompt, max_new_tokens=256, sampling=GREEDY, stop_ids=tok.end_ids,
                             constraint=grammar.matcher()))

    t = time.perf_counter()
    Grammar.json_schema(tok, SCHEMA)
    llg_compile = time.perf_counter() - t
    matcher, llg_masks = grammar.matcher(), []
    for token in sequence:
        t = time.perf_counter()
        matcher.allowed()
        llg_masks.append(time.perf_counter() - t)
        matcher.advance(token)

    t = time.perf_counter()
    # the same bound on whitespace as ours (a newline and up to 20 blanks)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True, max_whitespace_cnt=21)
    xgr_compile = time.perf_counter() - t
    xm = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    xgr_masks = []
    for token in sequence:
        t = time.perf_counter()
        xm.fill_next_token_bitmask(bitmask)
        np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:tok.vocab_size].astype(bool)
        xgr_masks.append(time.perf_counter() - t)
        assert xm.accept_token(token), "xgrammar refused a token llguidance allowed"

    coverage = {}
    for name, schema in COVERAGE.items():
        try:
            Grammar.json_schema(tok, schema)
            ll = "yes"
        except GrammarError as e:
            ll = f"no ({str(e)[:60]})"
        try:
            compiler.compile_json_schema(json.dumps(schema))
            xg = "yes"
        except Exception as e:  # noqa: BLE001 (report whatever it raises)
            xg = f"no ({type(e).__name__}: {str(e)[:60]})"
        coverage[name] = {"llguidance": ll, "xgrammar": xg}
    us = lambda xs: round(statistics.median(xs) * 1e6, 1)  # noqa: E731
    return {"tokens": len(sequence),
            "setup_s": {"llguidance": round(llg_setup, 3), "xgrammar": round(xgr_setup, 3)},
            "compile_s": {"llguidance": round(llg_compile, 4), "xgrammar": round(xgr_compile, 4)},
            "mask_us_median": {"llguidance": us(llg_masks), "xgrammar": us(xgr_masks)},
            "mask_us_max": {"llguidance": round(max(llg_masks) * 1e6, 1), "xgrammar": round(max(xgr_masks) * 1e6, 1)},
            "coverage": coverage}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--engines", action="store_true", help="also compare llguidance with xgrammar")
    args = ap.parse_args()
    import torch

    from llamalite.formats.load import load
    from llamalite.formats.store import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(resolve_model(args.model))
    result = {"decode": decode_rates(lm, args.tokens, args.repeats)}
    if args.engines:
        result["engines"] = engines(lm)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
