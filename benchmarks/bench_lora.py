"""Decode speed with a LoRA adapter served unmerged, against the same adapter merged into the model.

    python benchmarks/bench_lora.py [--threads 2] [--repeats 5] [--tokens 128]

On the default model (Q4_1): a random adapter (rank 8 on wq wk wv wo, `llamalite finetune`'s default,
and rank 16 on all seven projections) is (a) served unmerged on the Q4_1 base through
llamalite.runtime.adapters, and (b) merged into the dequantized weights and exported as Q4_1 again (what
`llamalite export` writes). Single-stream greedy decode of --tokens tokens after a short prompt, and the
engine's batched step with 4 streams (2 on the base, 2 on the adapter, against 4 on the merged model).
The variants run in turn within each repeat; medians of --repeats, with min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    import torch

    from llamalite.runtime.adapters import AdapterSet
    from llamalite.formats.export import export_gguf
    from llamalite.generation.tokens import generate
    from llamalite.formats.load import load
    from llamalite.train.lora import apply_lora, lora_layers, merge_lora
    from llamalite.serve.engine import Engine, Request
    from llamalite.generation.sampling import GREEDY
    from llamalite.formats.store import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    setups = {"rank8_attention": (8, ("wq", "wk", "wv", "wo")),
              "rank16_all": (16, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))}
    base = load(path)
    adapters = AdapterSet(base.model)
    merged = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (rank, targets)) in enumerate(setups.items()):
            dense = load(path, quantized=False)
            apply_lora(dense.model, rank=rank, alpha=2 * rank, targets=targets, seed=k)
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for _, _, m in lora_layers(dense.model):
                    m.lora_b.normal_(0, 0.02, generator=g)
            pairs = {(i, t): (m.lora_a.detach().clone(), m.lora_b.detach() * m.scale)
                     for i, t, m in lora_layers(dense.model)}
            assert adapters.add(name, pairs) == k
            out = export_gguf(merge_lora(dense.model), dense.tokenizer, Path(tmp) / f"{name}.gguf", "q4_1")
            merged[name] = load(out)
            del dense

        prompt = base.tokenizer.encode("Write a short story about a lighthouse keeper.")

        def single(model, adapter: int | None) -> float:
            with adapters.use([adapter]):
                first = None
                for n, _ in enumerate(generate(model, prompt, max_new_tokens=args.tokens + 1, sampling=GREEDY)):
                    if n == 0:
                        first = time.perf_counter()  # decode only: from the first token on
            return args.tokens / (time.perf_counter() - first) if first else 0.0

        def batch(model, row_adapters: list[int | None]) -> float:
            engine = Engine(model, max_batch=len(row_adapters), max_seq_len=512).start()
            try:
                requests = [engine.submit(Request(prompt, max_tokens=args.tokens, adapter=a)) for a in row_adapters]
                start = time.perf_counter()
                total = sum(sum(1 for e in r if hasattr(e, "token")) for r in requests)
                return total / (time.perf_counter() - start)
            finally:
                engine.stop()

        runs: dict[str, list[float]] = {}
        single(base.model, None)  # warm-up
        for _ in range(args.repeats):
            runs.setdefault("base_q4_1", []).append(single(base.model, None))
            for k, name in enumerate(setups):
                runs.setdefault(f"{name}/unmerged", []).append(single(base.model, k))
                runs.setdefault(f"{name}/merged_q4_1", []).append(single(merged[name].model, None))
                runs.setdefault(f"{name}/batch4_unmerged_2of4", []).append(batch(base.model, [None, k, None, k]))
                runs.setdefault(f"{name}/batch4_merged", []).append(batch(merged[name].model, [None] * 4))
    result = {"model": path.name, "threads": torch.get_num_threads(), "tokens": args.tokens,
              "tok_per_s": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                "max": round(max(v), 1)} for k, v in runs.items()}}
    ratios = {}
    for name in setups:
        med = result["tok_per_s"]
        # against the base file itself (the same tensor types: the adapter's own cost) and against the merged
        # export, whose output layer is Q4_1 where the default file's tied one is Q8_0
        ratios[f"{name}/single_vs_base"] = round(med[f"{name}/unmerged"]["median"] / med["base_q4_1"]["median"], 3)
        ratios[f"{name}/single"] = round(med[f"{name}/unmerged"]["median"] / med[f"{name}/merged_q4_1"]["median"], 3)
        ratios[f"{name}/batch4"] = round(med[f"{name}/batch4_unmerged_2of4"]["median"] /
                                         med[f"{name}/batch4_merged"]["median"], 3)
    result["unmerged_over_merged"] = ratios
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
