"""The KV cache of an ExecuTorch program as its state (mutable buffers that `llama::update_cache` writes in
place: what `export --to executorch` makes) against the cache as inputs and outputs of each call: decode
time a token, side by side in one process, on random weights of the default model's shape.

    python benchmarks/bench_ondevice_kv.py [--layers 4] [--max-seq-len 512] [--steps 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from torch.export import Dim, export

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.runtime import Runtime
    from llamalite.model.config import ModelConfig
    from llamalite.model.transformer import Transformer
    from llamalite.ondevice.export import OnDevice, plain_copy

    class CacheInOut(OnDevice):
        """The same program with each layer's cache given in and handed back."""

        def forward(self, tokens, input_pos, *caches):
            self.given, self.new = caches, []
            logits = super().forward(tokens, input_pos)
            return (logits, *self.new)

        def _attend(self, i, q, k, v, start, input_pos):
            k_cache = self.given[2 * i].index_copy(1, input_pos, k)
            v_cache = self.given[2 * i + 1].index_copy(1, input_pos, v)
            self.new += [k_cache, v_cache]
            return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)

    S = args.max_seq_len
    cfg = ModelConfig(dim=576, n_layers=args.layers, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                      context_length=S)
    torch.manual_seed(0)
    plain = plain_copy(Transformer(cfg).eval())
    caches = tuple(torch.zeros(1, S, cfg.n_kv_heads, cfg.head_dim) for _ in range(2 * cfg.n_layers))
    T = Dim("T", min=1, max=S)
    where = tempfile.mkdtemp()
    methods = {}
    for name, module, extra in (("state", OnDevice(plain, S), ()), ("inputs and outputs", CacheInOut(plain, S), caches)):
        shapes = {"tokens": {1: T}, "input_pos": {0: T}} | ({"caches": tuple(None for _ in extra)} if extra else {})
        with torch.no_grad():
            exported = export(module.eval(), (torch.zeros(1, 2, dtype=torch.long), torch.arange(2), *extra),
                              dynamic_shapes=shapes, strict=False)
            lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            program = lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
        path = f"{where}/{len(methods)}.pte"
        open(path, "wb").write(program.buffer)
        methods[name] = Runtime.get().load_program(path).load_method("forward")
    start = S // 2
    prompt = torch.randint(0, cfg.vocab_size, (1, start))
    methods["state"].execute([prompt, torch.arange(start)])
    held = list(methods["inputs and outputs"].execute([prompt, torch.arange(start), *caches])[1:])
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(2):  # alternating
        for name, method in methods.items():
            t = time.perf_counter()
            for pos in range(start, start + args.steps):
                inputs = [torch.tensor([[7]]), torch.tensor([pos])]
                if name == "state":
                    method.execute(inputs)
                else:
                    held = list(method.execute(inputs + held)[1:])
            times[name].append((time.perf_counter() - t) / args.steps * 1000)
    print(f"{cfg.n_layers} layers of the default model's shape, fp32, {args.steps} decode steps from position {start} "
          f"of {S}, {torch.get_num_threads()} threads, best of 2")
    for name, ms in times.items():
        print(f"| KV cache as {name} | {min(ms):.2f} ms a token |")


if __name__ == "__main__":
    main()
