"""How faithful the fast path (kernels: int16 activations, dot products for decode, int16 GEMM for
prefill) is to the reference (every weight dequantized to fp32, PyTorch's own ops) on the default
model: greedy answers to chat prompts token for token, and the largest logit difference over each
whole prompt (prefill) and over single tokens (decode). With --peer, llama.cpp's greedy answers from the
same token ids are held against the same reference. The reference's KV cache is fp32; the fast path's
is llamalite's default (f16 on CPUs) or --kv's.

    python benchmarks/faithfulness.py [--model FILE.gguf] [--tokens 48] [--peer] [--kv f16|bf16|q8_0|f32]
                                      [--program X.pte]

With --program, an ExecuTorch program of the model (`llamalite export --to executorch`) is held against
the reference in place of the fast path.
"""

from __future__ import annotations

import argparse
import json

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Explain photosynthesis in one paragraph.",
    "What is 17 times 23?",
    "Write a haiku about autumn.",
    "Who wrote Pride and Prejudice?",
    "List the planets of the solar system.",
    "What does HTTP stand for?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of tea?",
]


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token that differs (or where one answer stops early); None if equal."""
    first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
    if first is None and len(got) != len(want):
        first = min(len(got), len(want))
    return first


def llamacpp_greedy(llm, ids: list[int], n: int, stop_ids) -> list[int]:
    """llama.cpp's greedy answer (top-1, no repeat penalty) to the same prompt tokens."""
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t in stop_ids or len(out) == n:
            break
        out.append(t)
    return out


def main() -> None:
    from llamalite.text.chat_template import render_chat
    from llamalite.generation.tokens import generate
    from llamalite.formats.load import load
    from llamalite.kernels.ops import simd_path
    from llamalite.generation.sampling import GREEDY
    from llamalite.formats.store import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the embedded default model)")
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    p.add_argument("--peer", action="store_true", help="also llama.cpp's answers (needs llama-cpp-python)")
    p.add_argument("--kv", choices=("f32", "f16", "bf16", "q8_0"), help="the fast path's KV cache (default: llamalite's)")
    p.add_argument("--program", help="an ExecuTorch program (.pte) of the model, held against the reference instead")
    args = p.parse_args()
    path = args.model or default_model_path()
    fast = load(args.program) if args.program else load(path, kv_type=args.kv)
    exact = load(path, quantized=False, kv_type="f32")
    peer = None
    if args.peer:
        from llama_cpp import Llama

        peer = Llama(str(path), n_ctx=512, verbose=False)
    tok = fast.tokenizer
    same, peer_same, worst_prefill, worst_decode, rows = 0, 0, 0.0, 0.0, []
    for question in PROMPTS:
        ids = tok.encode(render_chat(fast.chat_template, tok, [{"role": "user", "content": question}]), add_bos=False)
        with torch.no_grad():
            x = torch.tensor([ids])
            a, b = fast.model(x), exact.model(x)
            prefill = ((a - b).abs().max() / b.abs().max()).item()
            a, b = fast.model(x[:, :1]), exact.model(x[:, :1])
            decode = ((a - b).abs().max() / b.abs().max()).item()
        got = list(generate(fast.model, ids, max_new_tokens=args.tokens, sampling=GREEDY, stop_ids=tok.end_ids))
        want = list(generate(exact.model, ids, max_new_tokens=args.tokens, sampling=GREEDY, stop_ids=tok.end_ids))
        first = first_difference(got, want)
        same += first is None
        worst_prefill, worst_decode = max(worst_prefill, prefill), max(worst_decode, decode)
        rows.append({"prompt": question, "prompt_tokens": len(ids), "tokens": len(want), "first_difference": first,
                     "prefill_rel_err": prefill, "decode_rel_err": decode})
        if peer:
            rows[-1]["llamacpp_first_difference"] = first_difference(
                llamacpp_greedy(peer, ids, args.tokens, set(tok.end_ids)), want)
            peer_same += rows[-1]["llamacpp_first_difference"] is None
    if peer:
        peer.close()
    summary = {"model": str(args.program or path), "kernels": "executorch" if args.program else simd_path(),
               "kv_type": fast.model.kv_type, "prompts": len(PROMPTS),
               "identical": same}
    if peer:
        summary["llamacpp_identical"] = peer_same
    print(json.dumps({**summary, "max_prefill_rel_err": worst_prefill, "max_decode_rel_err": worst_decode,
                      "per_prompt": rows}, indent=1))


if __name__ == "__main__":
    main()
