"""Run by tests/distributed/test_parallel.py, in one process or as each rank under torchrun (split by heads, or with
--pp by layers): for every GGUF file given, the logits of a full forward, of a cached prefill and one
decode step, 16 greedy tokens, the last hidden states, what this process holds (bytes of layer
weights, peak RSS), whether its decode step is the kernels' one call, and how its all-reduces travel, saved to OUT/<file stem>-<rank>.pt.

    python tests/distributed/parallel_worker.py [--pp] OUT FILE...
"""

import resource
import sys
from pathlib import Path

import torch


def held_bytes(model) -> dict[str, int]:
    """Bytes of the blocks' weights and of everything else this model holds (parameters and blocks)."""
    from llamalite.runtime.quantized import QuantEmbedding, QuantLinear

    layers = other = 0
    seen = set()
    for name, module in model.named_modules():
        tensors = [module.raw] if isinstance(module, (QuantLinear, QuantEmbedding)) else \
            list(module.parameters(recurse=False))
        for t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            n = t.numel() * t.element_size()
            if name.startswith("layers.") and "norm" not in name:
                layers += n
            else:
                other += n
    return {"layers": layers, "other": other}


def main() -> None:
    from llamalite.generation.tokens import generate
    from llamalite.backends import load
    from llamalite.distributed.group import from_env
    from llamalite.distributed.tensor_parallel import transport
    from llamalite.generation.sampling import GREEDY

    args = sys.argv[1:]
    pipeline = "--pp" in args
    args = [a for a in args if a != "--pp"]
    out = Path(args[0])
    shard = from_env()
    rank = shard.rank if shard else 0
    for path in args[1:]:
        lm = load(path, shard=shard, pipeline=pipeline)
        ids = lm.tokenizer.encode("The capital of France is a city of")[:10]
        with torch.no_grad():
            full = lm.model(torch.tensor([ids]))
            lm.model.setup_caches(1, 64)
            pre = lm.model(torch.tensor([ids[:6]]), torch.arange(6))
            step = lm.model(torch.tensor([ids[6:7]]), torch.tensor([6]))
            hidden = lm.model.hidden(torch.tensor([ids]))
            # a longer cached prefill (by layers: in micro-batches through the stages), then a step after it
            lm.model.setup_caches(1, 64)
            long_ids = (ids * 5)[:40]
            long = lm.model(torch.tensor([long_ids]), torch.arange(40), last_only=True)
            after = lm.model(torch.tensor([ids[:1]]), torch.tensor([40]))
        tokens = list(generate(lm.model, ids, max_new_tokens=16, sampling=GREEDY))
        torch.save({"full": full, "pre": pre, "step": step, "hidden": hidden, "long": long, "after": after, "tokens": tokens, "held": held_bytes(lm.model),
                    "plan": any(getattr(lm.model, a, None) is not None for a in ("plan", "stage_plan")), "transport": transport() if shard else None,
                    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
                   out / f"{Path(path).stem}-{rank}.pt")
    if shard is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
