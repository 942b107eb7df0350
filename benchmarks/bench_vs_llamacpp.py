"""llamalite against llama.cpp (llama-cpp-python) on the same GGUF file, thread count and prompt token
ids, side by side in one run: each measurement is a fresh process, the two alternate, and the table
gives medians and the ratio llamalite / llama.cpp.

    pip install llama-cpp-python      # or `make peer`: a source build of about 8 minutes
    python benchmarks/bench_vs_llamacpp.py [--model FILE.gguf] [--threads 2] [--repeats 3] [--long]
        [--kv f16|q8_0|f32|bf16] [--peer-kv f16|q8_0|f32]

--long adds 2k, 4k and 8k tokens of context. --kv is llamalite's KV cache type (default: its own
default), --peer-kv llama.cpp's (default f16, its own; q8_0 turns on its flash attention, which a
quantized V cache needs). The llama.cpp worker imports only llama_cpp and numpy (no torch, nothing of
llamalite): its load time and peak RSS are what a llama.cpp user sees.

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
LONG = [("2k tokens of context", 2048, 32), ("4k tokens of context", 4096, 32), ("8k tokens of context", 8000, 32)]
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # llama.cpp's type_k / type_v


def llamacpp_worker(model: str, ids_file: str, gen_tokens: int, threads: int, kv: str) -> dict:
    """One run of llama.cpp in this process (which imports nothing else of ours, nor torch): load, time
    to first token, decode, prefill, peak RSS."""
    import resource

    import numpy as np
    from llama_cpp import Llama

    ids = json.loads(open(ids_file).read())
    prompt_tokens = len(ids)
    t0 = time.perf_counter()
    n_ctx = prompt_tokens + gen_tokens + 8
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False,
                type_k=GGML_TYPES[kv], type_v=GGML_TYPES[kv], **({"flash_attn": True} if kv == "q8_0" else {}))
    load_s = time.perf_counter() - t0
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
            "decode_tok_s": (gen_tokens - 1) / decode_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
    p.add_argument("--long", action="store_true", help="add 2k, 4k and 8k tokens of context")
    p.add_argument("--kv", choices=("f32", "f16", "bf16", "q8_0"), help="llamalite's KV cache type (default: its own)")
    p.add_argument("--peer-kv", choices=tuple(GGML_TYPES), default="f16", help="llama.cpp's KV cache type (default f16)")
    p.add_argument("--worker", nargs=3, metavar=("IDS_FILE", "GEN", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        ids_file, gen, model = args.worker
        print(json.dumps(llamacpp_worker(model, ids_file, int(gen), args.threads, args.peer_kv)))
        return
    import tempfile

    from llamalite.eval.bench import bench_prompt
    from llamalite.formats.load import load_tokenizer
    from llamalite.formats.store import resolve_model

    model = str(resolve_model(args.model))
    tokenizer = load_tokenizer(resolve_model(args.model))
    keys = ["prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mib"]
    cases = CASES + (LONG if args.long else [])
    if args.case:
        cases = [(c.rsplit(":", 2)[0], int(c.rsplit(":", 2)[1]), int(c.rsplit(":", 2)[2])) for c in args.case]
    report = {"model": model, "threads": args.threads, "repeats": args.repeats, "compiled": args.compile,
              "kv": args.kv or "default", "peer_kv": args.peer_kv, "cases": {}}
    for label, prompt, gen in cases:
        ours, peer = [], []
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # both read the same token ids
            json.dump(bench_prompt(tokenizer, prompt), f)
        for _ in range(args.repeats):  # alternate, so drift on the machine hits both alike
            ours.append(run([sys.executable, "-m", "llamalite", "bench", "--model", model, "--json", "--repeats", "1",
                             "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--threads", str(args.threads)]
                            + (["--compile"] if args.compile else []) + (["--kv-type", args.kv] if args.kv else [])))
            peer.append(run([sys.executable, __file__, "--threads", str(args.threads), "--peer-kv", args.peer_kv,
                             "--worker", f.name, str(gen), model]))
        med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
        report["cases"][label] = {k: {"llamalite": med(ours, k), "llama.cpp": med(peer, k),
                                      "ratio": med(ours, k) / med(peer, k)} for k in keys}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mode = "decode step compiled" if args.compile else "eager"
    print(f"model {model}, {args.threads} threads, llamalite {mode} (KV cache {report['kv']}), llama.cpp KV cache "
          f"{args.peer_kv}, median of {args.repeats} alternating runs each")
    print(f"| case | figure | llamalite | llama.cpp | llamalite / llama.cpp |")
    print("|---|---|---|---|---|")
    for label, rows in report["cases"].items():
        for k in keys:
            r = rows[k]
            print(f"| {label} | {k} | {r['llamalite']:.3f} | {r['llama.cpp']:.3f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
