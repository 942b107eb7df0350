"""Perplexity's rate: `llamalite eval perplexity` against llama.cpp scoring the same windows (its
`perplexity` tool's method: windows of --ctx tokens, BOS first, the second half scored) on the same
token ids, each in a fresh process, alternating, side by side in one run. The llama.cpp worker imports
only llama_cpp and numpy.

    python benchmarks/bench_perplexity.py TEXT [--model FILE.gguf] [--ctx 512] [--threads 2] [--repeats 3]

Reports each side's scored windows per second and tokens per second (whole windows evaluated), and
both perplexities (the same within 1% when both score the same logits).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time


def llamacpp_worker(model: str, ids_file: str, ctx: int, threads: int, bos: int | None) -> dict:
    """llama.cpp's perplexity of the token ids in `ids_file`, and how long its windows took."""
    import numpy as np
    from llama_cpp import Llama

    ids = json.loads(open(ids_file).read())
    llm = Llama(model, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads, logits_all=True,
                verbose=False)
    nll, count, windows = 0.0, 0, len(ids) // ctx
    start = time.perf_counter()
    for i in range(windows):
        w = ids[i * ctx:(i + 1) * ctx]
        if bos is not None:
            w = [bos] + w[1:]
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[ctx // 2:ctx - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets = ids[i * ctx + ctx // 2 + 1:(i + 1) * ctx]
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    seconds = time.perf_counter() - start
    return {"perplexity": math.exp(nll / count), "seconds": seconds, "windows": windows}


def ours(model: str, text: str, ctx: int, threads: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "llamalite", "eval", "perplexity", text, "--model", model, "--ctx",
                          str(ctx), "--threads", str(threads), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"perplexity": report["perplexity"], "seconds": report["seconds"], "windows": report["windows"],
            "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text")
    p.add_argument("--model")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", nargs=2, metavar=("IDS_FILE", "BOS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        bos = None if args.worker[1] == "none" else int(args.worker[1])
        print(json.dumps(llamacpp_worker(args.model, args.worker[0], args.ctx, args.threads, bos)))
        return
    from llamalite.formats.load import load_tokenizer
    from llamalite.formats.store import resolve_model

    model = str(resolve_model(args.model))
    tok = load_tokenizer(model)
    text = open(args.text, encoding="utf-8").read()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(tok.encode(text, parse_special=False), f)
    bos = str(tok.bos_id) if tok.add_bos and tok.bos_id is not None else "none"
    mine, peer = [], []
    for _ in range(args.repeats):
        mine.append(ours(model, args.text, args.ctx, args.threads))
        run = subprocess.run([sys.executable, __file__, args.text, "--model", model, "--ctx", str(args.ctx),
                              "--threads", str(args.threads), "--worker", f.name, bos], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr)
        peer.append(json.loads(run.stdout.strip().splitlines()[-1]))
    rate = lambda runs: statistics.median(r["windows"] * args.ctx / r["seconds"] for r in runs)  # noqa: E731
    report = {"model": model, "text": args.text, "ctx": args.ctx, "threads": args.threads, "repeats": args.repeats,
              "windows": mine[0]["windows"],
              "llamalite": {"tok_s": rate(mine), "perplexity": mine[0]["perplexity"]},
              "llama.cpp": {"tok_s": rate(peer), "perplexity": peer[0]["perplexity"]}}
    report["ratio"] = report["llamalite"]["tok_s"] / report["llama.cpp"]["tok_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
