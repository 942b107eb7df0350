"""llamalite against llama.cpp (llama-cpp-python) on the same GGUF file, thread count and prompt,
side by side in one run: each measurement is a fresh process, the two alternate, and the table
gives medians and the ratio llamalite / llama.cpp.

    pip install llama-cpp-python      # or `make peer`: a source build of about 8 minutes
    python benchmarks/bench_vs_llamacpp.py [--model FILE.gguf] [--threads 2] [--repeats 3]

A row's ratio is "higher is better" for rates and "lower is better" for times and memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = [  # (label, prompt tokens, generated tokens)
    ("short context", 128, 128),
    ("512 tokens of context", 512, 64),
]


def llamacpp_worker(model: str, prompt_tokens: int, gen_tokens: int, threads: int) -> dict:
    """One run of llama.cpp in this process: load, time to first token, decode, prefill, peak RSS."""
    from llama_cpp import Llama

    from llamalite.bench import BENCH_TEXT, peak_rss_mib

    import numpy as np

    t0 = time.perf_counter()
    n_ctx = prompt_tokens + gen_tokens + 8
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += llm.tokenize(BENCH_TEXT.encode(), add_bos=False, special=True)
    ids = ids[:prompt_tokens]
    n_vocab = llm.n_vocab()

    def decode(tokens: list[int], n_past: int) -> int:
        """Evaluate tokens at positions n_past.. (batches of 512, logits for the last only); greedy next id.
        llama-cpp-python's internals, because its high-level eval keeps a logits row per batch slot."""
        for i in range(0, len(tokens), 512):
            llm._batch.set_batch(batch=tokens[i:i + 512], n_past=n_past + i, logits_all=False)
            llm._ctx.decode(llm._batch)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    t0 = time.perf_counter()
    token = decode(ids, 0)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(gen_tokens - 1):
        token = decode([token], prompt_tokens + i)
    decode_s = time.perf_counter() - t1
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    decode(ids, 0)
    prefill_s = time.perf_counter() - t0
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tok_s": prompt_tokens / prefill_s,
            "decode_tok_s": (gen_tokens - 1) / decode_s, "peak_rss_mib": peak_rss_mib()}


def run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--compile", action="store_true", help="llamalite with its decode step compiled")
    p.add_argument("--case", action="append", metavar="LABEL:PROMPT:GEN",
                   help="instead of the default cases, e.g. '7B shape:32:16' (repeatable)")
    p.add_argument("--worker", nargs=3, metavar=("PROMPT", "GEN", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        prompt, gen, model = args.worker
        print(json.dumps(llamacpp_worker(model, int(prompt), int(gen), args.threads)))
        return
    from llamalite.store import resolve_model

    model = str(resolve_model(args.model))
    keys = ["prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mib"]
    cases = CASES
    if args.case:
        cases = [(c.rsplit(":", 2)[0], int(c.rsplit(":", 2)[1]), int(c.rsplit(":", 2)[2])) for c in args.case]
    report = {"model": model, "threads": args.threads, "repeats": args.repeats, "compiled": args.compile, "cases": {}}
    for label, prompt, gen in cases:
        ours, peer = [], []
        for _ in range(args.repeats):  # alternate, so drift on the machine hits both alike
            ours.append(run([sys.executable, "-m", "llamalite", "bench", "--model", model, "--json", "--repeats", "1",
                             "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--threads", str(args.threads)]
                            + (["--compile"] if args.compile else [])))
            peer.append(run([sys.executable, __file__, "--threads", str(args.threads), "--worker", str(prompt),
                             str(gen), model]))
        med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
        report["cases"][label] = {k: {"llamalite": med(ours, k), "llama.cpp": med(peer, k),
                                      "ratio": med(ours, k) / med(peer, k)} for k in keys}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mode = "decode step compiled" if args.compile else "eager"
    print(f"model {model}, {args.threads} threads, llamalite {mode}, median of {args.repeats} alternating runs each")
    print(f"| case | figure | llamalite | llama.cpp | llamalite / llama.cpp |")
    print("|---|---|---|---|---|")
    for label, rows in report["cases"].items():
        for k in keys:
            r = rows[k]
            print(f"| {label} | {k} | {r['llamalite']:.3f} | {r['llama.cpp']:.3f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
