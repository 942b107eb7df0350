"""Write a Llama-2-7B-shaped Q4_0 GGUF with seeded random weights, for the 7B rows of BENCHMARKS.md.

Layer shapes are Llama 2 7B's (dim 4096, 32 layers, 32 heads, FFN 11008); the tokenizer (and so the
vocabulary, 49152 tokens instead of 32000) is copied from the default model, so that both llamalite
and llama.cpp can load the file. About 3.9 GB; a few minutes on two cores.

    python benchmarks/make_7b_gguf.py /tmp/llama2-7b-shape-q4_0.gguf
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType, GGUFWriter, quants

from llamalite.model.config import ModelConfig
from llamalite.formats.export import gguf_add_config
from llamalite.formats.store import default_model_path


def main(out: str) -> None:
    cfg = ModelConfig.from_preset("llama2-7b")
    src = GGUFReader(default_model_path())
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w = GGUFWriter(out, "llama")
    gguf_add_config(w, cfg, vocab_size=vocab)
    w.add_file_type(2)  # MOSTLY_Q4_0
    for field in src.fields.values():
        if field.name.startswith("tokenizer."):
            if field.types[0] == GGUFValueType.ARRAY:
                w.add_array(field.name, field.contents())
            else:
                w.add_key_value(field.name, field.contents(), field.types[0])
    rng = np.random.default_rng(0)

    def q4(shape):
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return quants.quantize(x, T.Q4_0)

    w.add_tensor("token_embd.weight", q4((vocab, cfg.dim)), raw_dtype=T.Q4_0)
    w.add_tensor("output_norm.weight", np.ones(cfg.dim, np.float32))
    w.add_tensor("output.weight", q4((vocab, cfg.dim)), raw_dtype=T.Q4_0)
    for i in range(cfg.n_layers):
        print(f"layer {i + 1}/{cfg.n_layers}", file=sys.stderr, flush=True)
        for name, shape in (("attn_q", (cfg.dim, cfg.dim)), ("attn_k", (cfg.dim, cfg.dim)),
                            ("attn_v", (cfg.dim, cfg.dim)), ("attn_output", (cfg.dim, cfg.dim)),
                            ("ffn_gate", (cfg.hidden_dim, cfg.dim)), ("ffn_up", (cfg.hidden_dim, cfg.dim)),
                            ("ffn_down", (cfg.dim, cfg.hidden_dim))):
            w.add_tensor(f"blk.{i}.{name}.weight", q4(shape), raw_dtype=T.Q4_0)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(cfg.dim, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(cfg.dim, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama2-7b-shape-q4_0.gguf")
