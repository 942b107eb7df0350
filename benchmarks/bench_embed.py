"""Embeddings per second on the default model, for batches of 1, 8 and 32 inputs.

    python benchmarks/bench_embed.py [--threads 2] [--repeats 5] [--words 24]

Each input is a sentence of about --words words (distinct sentences, so no two are the same length by
accident); a batch goes through `llamalite.generation.embed.embed_ids` in one call, which runs each input as its
own forward (so a text's vector is the same whatever else is asked with it), on this process's thread. Medians of
--repeats, with min and max.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

WORDS = ("the a cat dog river city model token light music garden winter market train story paper window "
         "mountain friend engine cloud night morning bread letter ocean forest song color").split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--words", type=int, default=24)
    args = ap.parse_args()
    import torch

    from llamalite.generation.embed import embed_ids
    from llamalite.formats.load import load
    from llamalite.formats.store import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(resolve_model(args.model))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(args.words + rng.randint(-4, 4))) + "." for _ in range(32)]
    ids = [lm.tokenizer.encode(t) for t in texts]
    result = {"tokens_per_input": round(statistics.mean(len(x) for x in ids), 1), "threads": torch.get_num_threads()}
    embed_ids(lm.model, ids[:8])  # warm-up
    for batch in (1, 8, 32):
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            embed_ids(lm.model, ids[:batch])
            rates.append(batch / (time.perf_counter() - t))
        result[f"batch_{batch}"] = {"inputs_per_s": round(statistics.median(rates), 1),
                                    "min_max": [round(min(rates), 1), round(max(rates), 1)]}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
