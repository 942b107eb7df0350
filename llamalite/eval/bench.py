"""`llamalite bench`: load time, prefill and decode rates, time to first token and peak memory of one
model on this machine, as medians over repeated runs with their min and max."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

BENCH_TEXT = (
    "LLaMA is a collection of foundation language models ranging from 7B to 65B parameters. The models "
    "are trained on trillions of tokens, and show that it is possible to train state-of-the-art models "
    "using publicly available datasets exclusively, without resorting to proprietary and inaccessible "
    "datasets. In particular, LLaMA-13B outperforms GPT-3 on most benchmarks. "
)


def bench_prompt(tokenizer, n: int) -> list[int]:
    """The first n ids of a fixed English text, repeated as needed (the peer benchmark uses the same)."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(BENCH_TEXT, add_bos=False)
    return ids[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(model_path: Path, prompt_tokens: int = 128, gen_tokens: int = 128, repeats: int = 3,
              compile: bool = False, shard=None, pipeline: bool = False, kv_type: str | None = None,
              speculation=None) -> dict:
    """Load, time to first token, decode and prefill speed, peak RSS: medians of `repeats` runs. With
    `speculation` (a function of the loaded model giving a speculative.Speculation), the decode is
    speculative and the result says how many drafted tokens were accepted, over all runs. Split
    over torchrun's ranks (`shard`, parallel.Shard; `pipeline` for stages), every rank runs the same and
    the result also lists each rank's peak RSS and the share of its decode spent in all-reduces."""
    from ..generation.tokens import generate
    from ..generation.steps import compile_decode, prefill
    from ..backends import load
    from ..distributed.group import Collectives
    from ..kernels.ops import simd_path
    from ..generation.sampling import GREEDY

    runs = []
    lm = None
    compile_s = None
    spec_stats = None
    for _ in range(repeats):
        del lm
        t0 = time.perf_counter()
        lm = load(model_path, shard=shard, pipeline=pipeline, kv_type=kv_type)
        load_s = time.perf_counter() - t0
        prompt = bench_prompt(lm.tokenizer, prompt_tokens)
        capacity = min(lm.config.context_length, prompt_tokens + gen_tokens)
        if compile:
            compile_decode(lm.model)
            lm.model.setup_caches(1, capacity)
            t0 = time.perf_counter()
            list(generate(lm.model, prompt, max_new_tokens=3, sampling=GREEDY))  # the compile happens here
            compile_s = compile_s or time.perf_counter() - t0
        # Time to first token: prefill plus the first sample, from a cold cache.
        lm.model.setup_caches(1, capacity)
        spec = speculation(lm) if speculation is not None else None
        t0 = time.perf_counter()
        tokens = generate(lm.model, prompt, max_new_tokens=gen_tokens, sampling=GREEDY, speculation=spec)
        next(tokens)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        Collectives.reset()
        n = 1 + sum(1 for _ in tokens)
        decode_s = time.perf_counter() - t1
        collective_s = Collectives.since_reset()
        if spec is not None:
            from ..generation.speculative import Stats

            spec_stats = spec_stats or Stats()
            for f in ("passes", "drafted", "accepted", "plain"):
                setattr(spec_stats, f, getattr(spec_stats, f) + getattr(spec.stats, f))
        # Prefill alone: the whole prompt again into an emptied cache.
        lm.model.cache_tokens = []
        t0 = time.perf_counter()
        prefill(lm.model, prompt)
        prefill_s = time.perf_counter() - t0
        runs.append({"load_s": load_s, "ttft_s": ttft, "prefill_tok_s": prompt_tokens / prefill_s,
                     "decode_tok_s": (n - 1) / decode_s if n > 1 else float("nan"),
                     "collective_share": collective_s / decode_s})
    keys = ["prefill_tok_s", "decode_tok_s", "ttft_s", "load_s"]
    result: dict = {k: statistics.median(r[k] for r in runs) for k in keys}
    result["peak_rss_mib"] = peak_rss_mib()
    result["min"] = {k: min(r[k] for r in runs) for k in keys}
    result["max"] = {k: max(r[k] for r in runs) for k in keys}
    result.update(model=str(model_path), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                  threads=torch.get_num_threads(), kernels=simd_path(), torch=torch.__version__,
                  compiled=compile, compile_s=compile_s, kv_type=lm.model.kv_type,
                  speculation=spec_stats.as_dict() if spec_stats is not None else None)
    if shard is not None:  # every rank's own figures, gathered
        import torch.distributed as dist

        mine = {"rank": shard.rank, "peak_rss_mib": result["peak_rss_mib"],
                "collective_share": statistics.median(r["collective_share"] for r in runs)}
        ranks: list = [None] * shard.world
        dist.all_gather_object(ranks, mine)
        from ..distributed.tensor_parallel import transport

        result.update(split="layers" if pipeline else "heads", world=shard.world, ranks=ranks,
                      all_reduce=None if pipeline else transport())
    return result
