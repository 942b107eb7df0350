"""One process against the same model split over torchrun's processes, by heads (tensor parallelism)
and by layers (pipeline stages), over gloo.

    python benchmarks/bench_parallel.py --model /tmp/llama2-7b-shape-q4_0.gguf [--tp 2] [--threads 2]
        [--prompt-tokens 128] [--gen-tokens 32]

Runs the model in one process with --threads threads, then under torchrun with --tp ranks of
threads/tp threads each, split by heads (the all-reduces through shared memory, as ranks on one
machine run them, then through gloo, as ranks on several machines do: LLAMALITE_TP_REDUCE=group) and
then by layers (--pp), in turn. Each run loads the model, prefills a --prompt-tokens prompt (time to
first token), then decodes --gen-tokens tokens greedily, and reports per rank: load seconds, TTFT,
decode tok/s, peak RSS, and the share of the decode spent in collectives and hand-overs
(parallel.Collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(model: str, prompt_tokens: int, gen_tokens: int, out: Path, pipeline: bool) -> None:
    import torch

    from llamalite.generation.tokens import generate
    from llamalite.formats.load import load
    from llamalite.distributed.group import Collectives, from_env
    from llamalite.generation.sampling import GREEDY

    shard = from_env()
    t0 = time.perf_counter()
    lm = load(model, shard=shard, pipeline=pipeline)
    load_s = time.perf_counter() - t0
    words = "the quick brown fox jumps over a lazy dog while the river runs past an old mill " * 40
    prompt = lm.tokenizer.encode(words)[:prompt_tokens]
    times = []
    Collectives.reset()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in generate(lm.model, prompt, max_new_tokens=gen_tokens + 1, sampling=GREEDY):
            times.append(time.perf_counter())
            if len(times) == 1:
                Collectives.reset()  # the decode's share only
    decode_s = times[-1] - times[0]
    rank = shard.rank if shard else 0
    result = {"rank": rank, "world": shard.world if shard else 1, "threads": torch.get_num_threads(),
              "load_s": round(load_s, 2), "ttft_s": round(times[0] - start, 3),
              "decode_tok_s": round(gen_tokens / decode_s, 2),
              "collective_share": round(Collectives.since_reset() / decode_s, 3) if shard else 0.0,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if shard is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--pp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.prompt_tokens, args.gen_tokens, Path(args.worker), args.pp)
        return 0
    me = [str(Path(__file__).resolve()), "--model", args.model, "--prompt-tokens", str(args.prompt_tokens),
          "--gen-tokens", str(args.gen_tokens)]
    report = {"model": Path(args.model).name, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens}
    split = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp), *me]
    each = max(1, args.threads // args.tp)
    for label, cmd, threads, reduce in (("one_process", [sys.executable, *me], args.threads, "auto"),
                                        (f"tp{args.tp}", split, each, "auto"),
                                        (f"tp{args.tp}_gloo", split, each, "group"),
                                        (f"pp{args.tp}", [*split, "--pp"], each, "auto")):
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLAMALITE_TP_REDUCE": reduce}
            run = subprocess.run([*cmd, "--worker", out], env=env, capture_output=True, text=True)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            report[label] = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
