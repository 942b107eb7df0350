"""The prompt cache on disk across a restart: `llamalite serve --prompt-cache DIR` answers a 2k-token chat
cold, is stopped, started again, and answers the same chat; time to first token each time, as a client
sees it (streaming, from the request to the first content chunk), and the tokens reported cached.

    python benchmarks/bench_prompt_cache.py [--model FILE] [--kv-type f16] [--repeats 3] [--threads 2]

Each repeat starts from an empty directory: cold (a fresh server, nothing cached), then restarted (a
fresh server, the entry the first one wrote on disk). Reports medians and the ratio, with the entry's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def chat() -> list[dict]:
    facts = " ".join(f"Fact {i}: the box numbered {i} holds {i * 3 % 17} red marbles." for i in range(120))
    return [{"role": "system", "content": "You answer questions about boxes."},
            {"role": "user", "content": facts + " How many marbles does box 7 hold?"}]


def one_server(model: str, cache: Path, kv: str, threads: int) -> dict:
    """Start a server, time one streamed reply to the chat, stop it cleanly."""
    import openai

    from llamalite.serve import wait_until_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llamalite", "serve", "--port", str(port), "--max-batch", "1", "--ctx", "4096",
           "--threads", str(threads), "--prompt-cache", str(cache), "--kv-type", kv, "--model-name", "m"]
    proc = subprocess.Popen(cmd + (["--model", model] if model else []), stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        start = time.perf_counter()
        ttft, text, usage = None, "", None
        for chunk in client.chat.completions.create(model="m", messages=chat(), max_tokens=16, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        return {"ttft_s": ttft, "text": text, "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.prompt_tokens_details.cached_tokens}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the default model")
    p.add_argument("--kv-type", default="f16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    runs = []
    for _ in range(args.repeats):
        cache = Path(tempfile.mkdtemp(prefix="llamalite-pc-"))
        try:
            cold = one_server(args.model, cache, args.kv_type, args.threads)
            size = sum(f.stat().st_size for f in cache.glob("*.llkv"))
            warm = one_server(args.model, cache, args.kv_type, args.threads)
        finally:
            shutil.rmtree(cache)
        assert warm["text"] == cold["text"], (warm["text"], cold["text"])
        runs.append({"cold": cold, "restarted": warm, "entry_bytes": size})
        print(json.dumps(runs[-1]), file=sys.stderr)
    cold = statistics.median(r["cold"]["ttft_s"] for r in runs)
    warm = statistics.median(r["restarted"]["ttft_s"] for r in runs)
    print(json.dumps({"kv_type": args.kv_type, "prompt_tokens": runs[0]["cold"]["prompt_tokens"],
                      "cached_tokens_after_restart": runs[0]["restarted"]["cached_tokens"],
                      "ttft_cold_s": round(cold, 3), "ttft_restarted_s": round(warm, 3),
                      "ratio": round(warm / cold, 3), "entry_mib": round(runs[0]["entry_bytes"] / 2**20, 1),
                      "same_reply": True, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
