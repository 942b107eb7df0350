"""Write a mixture-of-experts GGUF of a preset's shape (qwen3-30b-a3b, mixtral-8x7b, ... of
llamalite.model.config) with seeded random Q4_0 or Q8_0 blocks, for the MoE rows of BENCHMARKS.md.

Every layer has the preset's real shapes (attention, router, all its experts); `--layers` keeps the first
N layers only, so that a run fits a small machine's disk and time (decode reads per layer what the whole
model reads per layer: a token's rate scales with the layer count, the ratio to llama.cpp does not). The
tokenizer is the default model's, padded to the preset's vocabulary, so both llamalite and llama.cpp load
the file. Blocks are random bytes with a small random scale (quantizing random floats with the gguf
package would take hours at 30B); routers and norms are fp32, as llama.cpp's quantizer leaves them.
Tensors are written one at a time: memory stays at one tensor.

    python benchmarks/make_moe_gguf.py qwen3-30b-a3b /tmp/qwen3-30b-a3b-shape-q4_0.gguf --layers 16
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter

BLOCKS = {"q4_0": (T.Q4_0, 18, 2, 1), "q8_0": (T.Q8_0, 34, 8, 7)}  # type, bytes a block of 32, ftype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset")
    p.add_argument("out")
    p.add_argument("--layers", type=int, help="keep the first N layers (default: all)")
    p.add_argument("--type", choices=sorted(BLOCKS), default="q4_0")
    args = p.parse_args()
    import dataclasses

    from llamalite.formats.export import gguf_add_config, gguf_architecture
    from llamalite.formats.store import default_model_path
    from llamalite.model.config import ModelConfig

    cfg = ModelConfig.from_preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    qtype, block_bytes, _, ftype = BLOCKS[args.type]
    rng = np.random.default_rng(0)
    src = GGUFReader(default_model_path())
    tokens = src.fields["tokenizer.ggml.tokens"].contents()
    pad = cfg.vocab_size - len(tokens)
    w = GGUFWriter(args.out, gguf_architecture(cfg))
    gguf_add_config(w, cfg)
    w.add_file_type(ftype)
    for field in src.fields.values():
        if not field.name.startswith("tokenizer.") or field.name == "tokenizer.chat_template":
            continue
        value = field.contents()
        if field.name == "tokenizer.ggml.tokens":
            value = value + [f"[PAD{i}]" for i in range(pad)]
        elif field.name == "tokenizer.ggml.token_type":
            value = value + [5] * pad  # unused
        elif field.name == "tokenizer.ggml.scores":
            value = value + [-1000.0] * pad
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, field.types[0])

    def blocks(shape: tuple[int, ...]) -> np.ndarray:
        """Random blocks of `shape` (Meta order, the last dimension in elements), a d of about 1e-3."""
        n = int(np.prod(shape)) // 32
        raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
        raw[:, 0:2] = rng.uniform(5e-4, 2e-3, size=(n, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(*shape[:-1], shape[-1] // 32 * block_bytes)

    def f32(shape, value=None):
        return (np.ones(shape, np.float32) if value is None else
                rng.standard_normal(shape, dtype=np.float32) * value)

    nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    plan = [("token_embd.weight", (cfg.vocab_size, cfg.dim), None), ("output_norm.weight", (cfg.dim,), 1.0),
            ("output.weight", (cfg.vocab_size, cfg.dim), None)]
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (cfg.dim,), 1.0), (b + "ffn_norm.weight", (cfg.dim,), 1.0),
                 (b + "attn_q.weight", (nq, cfg.dim), None), (b + "attn_k.weight", (nk, cfg.dim), None),
                 (b + "attn_v.weight", (nk, cfg.dim), None), (b + "attn_output.weight", (cfg.dim, nq), None)]
        if cfg.qk_norm:
            plan += [(b + "attn_q_norm.weight", (cfg.head_dim,), 1.0), (b + "attn_k_norm.weight", (cfg.head_dim,), 1.0)]
        if cfg.qkv_bias:
            plan += [(b + f"attn_{x}.bias", (n,), 0.02) for x, n in (("q", nq), ("k", nk), ("v", nk))]
        E, H = cfg.n_experts, cfg.expert_hidden_dim
        plan += [(b + "ffn_gate_inp.weight", (E, cfg.dim), 0.02), (b + "ffn_gate_exps.weight", (E, H, cfg.dim), None),
                 (b + "ffn_up_exps.weight", (E, H, cfg.dim), None), (b + "ffn_down_exps.weight", (E, cfg.dim, H), None)]
        if cfg.shared_expert_dim:
            S = cfg.shared_expert_dim
            plan += [(b + "ffn_gate_shexp.weight", (S, cfg.dim), None), (b + "ffn_up_shexp.weight", (S, cfg.dim), None),
                     (b + "ffn_down_shexp.weight", (cfg.dim, S), None)]
            if cfg.shared_expert_gate:
                plan += [(b + "ffn_gate_inp_shexp.weight", (cfg.dim,), 0.02)]
    for name, shape, value in plan:  # the header first, then each tensor's data as it is made
        if value is None:
            w.add_tensor_info(name, (*shape[:-1], shape[-1] // 32 * block_bytes), np.dtype(np.uint8),
                              int(np.prod(shape)) // 32 * block_bytes, raw_dtype=qtype)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, (name, shape, value) in enumerate(plan):
        if name.endswith("ffn_gate_inp.weight"):
            print(f"layer {name.split('.')[1]} of {cfg.n_layers}", file=sys.stderr, flush=True)
        w.write_tensor_data(blocks(shape) if value is None else f32(shape, None if value == 1.0 else value))
    w.close()
    total, active = cfg.parameter_counts()
    print(f"wrote {args.out}: {cfg.n_layers} layers, {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B a token")


if __name__ == "__main__":
    main()
