"""Write a Q4_0 GGUF of a preset's shape (a Qwen2.5, Qwen3, Mistral or Llama preset of llamalite.model.config)
with seeded random weights, for the families' rows of BENCHMARKS.md. The tokenizer is the default
model's (the vocabulary padded to the preset's), so that llamalite and llama.cpp both load the file.

    python benchmarks/make_family_gguf.py qwen2.5-0.5b /tmp/qwen2.5-0.5b-shape-q4_0.gguf [--steps]

--steps then times the kernels' one-call decode step (DecodePlan) against the same model stepping layer by
layer, side by side in this process (32 tokens after a 64-token prompt, best of 3, alternating).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset")
    p.add_argument("out")
    p.add_argument("--steps", action="store_true", help="time the one-call step against the layers' step")
    args = p.parse_args()
    from llamalite.model.config import ModelConfig
    from llamalite.formats.export import export_gguf
    from llamalite.formats.load import load, load_tokenizer
    from llamalite.model.transformer import Transformer
    from llamalite.formats.store import default_model_path

    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                t.normal_(0, 0.1)
            else:
                t.normal_(0, 0.02)
    path = export_gguf(model, load_tokenizer(default_model_path()), args.out, dtype="q4_0")
    print(f"wrote {path}")
    if not args.steps:
        return
    fast = load(path).model
    fast.setup_caches(1, 256, "f16")
    plan, times = fast.plan, {"one call (DecodePlan)": [], "layer by layer": []}
    with torch.no_grad():
        fast(torch.randint(0, 1000, (1, 64)), torch.arange(64))
        for _ in range(3):
            for name in times:
                fast.plan = plan if name.startswith("one") else None
                start = time.perf_counter()
                for pos in range(64, 96):
                    fast(torch.tensor([[5]]), torch.tensor([pos]))
                times[name].append(32 / (time.perf_counter() - start))
    fast.plan = plan
    for name, rates in times.items():
        print(f"| {name} | {max(rates):.1f} tok/s |")


if __name__ == "__main__":
    main()
