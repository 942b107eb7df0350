"""Continuous batching under concurrent clients: `llamalite serve`'s aggregate tokens/s with N
streaming clients at once against one client alone, in one run on one server process.

    python benchmarks/bench_server.py [--model FILE.gguf] [--clients 8] [--tokens 64] [--repeats 3]

Each client streams a chat completion through the official `openai` client with its own question,
temperature 0 and a fixed max_tokens; tokens are counted from the streamed chunks. The single-stream
rate and the N-client aggregate alternate, repeats times; the table gives medians and the ratio.
It also checks that every concurrent greedy reply equals its solo run.

    python benchmarks/bench_server.py --engine-only

measures the batching engine alone in this process (no HTTP, no client threads sharing the
cores): one request's decode rate against N requests decoded together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = ["Tell me a story about a brave knight.", "Explain how a rainbow forms.", "Describe the city of Paris.",
             "Write a poem about the ocean.", "What makes a good friend?", "Describe a day on a farm.",
             "Explain why the sky is blue.", "Tell me about the history of bread.", "Describe a thunderstorm.",
             "What do cats like to do?", "Explain how trains work.", "Describe a forest in autumn.",
             "Tell me about the moon.", "What is the best way to learn to cook?", "Describe a busy market.",
             "Explain how plants grow."]


def stream_one(client, question: str, max_tokens: int) -> tuple[str, int]:
    """One streamed greedy reply and its token count (from the stream's usage chunk)."""
    pieces, tokens = [], 0
    for chunk in client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(pieces), tokens


def engine_only(args) -> int:
    """Requests submitted straight to the engine, stepped on this (the loading) thread."""
    import torch

    from llamalite.text.chat_template import render_chat
    from llamalite.serve.engine import Engine, Request, TokenEvent
    from llamalite.formats.load import load
    from llamalite.formats.store import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(resolve_model(args.model))
    engine = Engine(lm.model, max_batch=args.clients, max_seq_len=1024)
    questions = (QUESTIONS * (1 + args.clients // len(QUESTIONS)))[:args.clients]
    prompts = [lm.tokenizer.encode(render_chat(lm.chat_template, lm.tokenizer, [{"role": "user", "content": q}]),
                                   add_bos=False) for q in questions]

    def rate(batch: list[list[int]]) -> float:
        requests = [engine.submit(Request(p, max_tokens=args.tokens)) for p in batch]
        t = time.perf_counter()
        while engine.active or engine.waiting:
            engine.step()
        return sum(sum(isinstance(e, TokenEvent) for e in r) for r in requests) / (time.perf_counter() - t)

    rate(prompts)  # warm-up
    single, aggregate = [], []
    for _ in range(args.repeats):
        single.append(rate(prompts[:1]))
        aggregate.append(rate(prompts))
    s, a = statistics.median(single), statistics.median(aggregate)
    print(f"| engine, 1 request | {s:.1f} tok/s (min {min(single):.1f}, max {max(single):.1f}) |")
    print(f"| engine, {args.clients} requests | {a:.1f} tok/s (min {min(aggregate):.1f}, max {max(aggregate):.1f}) |")
    print(f"| ratio | {a / s:.2f}x |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of each reply")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="CPU threads for the server (default: one per core)")
    ap.add_argument("--engine-only", action="store_true", help="the engine without HTTP, in this process")
    args = ap.parse_args()
    if args.engine_only:
        return engine_only(args)

    import socket
    import subprocess

    import openai

    from llamalite.serve import wait_until_serving

    with socket.socket() as sock:  # a free port for the server
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The server as users run it: its own process, engine on its main thread.
    cmd = [sys.executable, "-m", "llamalite", "serve", "--port", str(port), "--model-name", "bench",
           "--max-batch", str(args.clients), "--ctx", "1024"] + (["--model", args.model] if args.model else []) + (
        ["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        questions = (QUESTIONS * (1 + args.clients // len(QUESTIONS)))[:args.clients]
        solo_texts = [stream_one(client, q, args.tokens)[0] for q in questions]  # warm-up and reference
        single, aggregate = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            n = stream_one(client, questions[0], args.tokens)[1]
            single.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                replies = list(pool.map(lambda q: stream_one(client, q, args.tokens), questions))
            aggregate.append(sum(n for _, n in replies) / (time.perf_counter() - t))
            assert [text for text, _ in replies] == solo_texts, "a concurrent greedy reply differs from its solo run"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    s, a = statistics.median(single), statistics.median(aggregate)
    result = {"clients": args.clients, "max_tokens": args.tokens, "threads": args.threads or "default",
              "single_stream_tok_s": round(s, 1), "aggregate_tok_s": round(a, 1), "ratio": round(a / s, 2),
              "single_min_max": [round(min(single), 1), round(max(single), 1)],
              "aggregate_min_max": [round(min(aggregate), 1), round(max(aggregate), 1)],
              "replies_equal_solo": True}
    print(f"| 1 client | {s:.1f} tok/s (min {min(single):.1f}, max {max(single):.1f}) |")
    print(f"| {args.clients} clients | {a:.1f} tok/s aggregate (min {min(aggregate):.1f}, max {max(aggregate):.1f}) |")
    print(f"| ratio | {a / s:.2f}x |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
