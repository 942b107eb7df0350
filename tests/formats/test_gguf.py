import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants as gq

from llamalite.model.config import ModelConfig
from llamalite.formats.load import ModelFileError, load
from llamalite.formats.build import build_model
from llamalite.formats.gguf import gguf_to_meta_name
from llamalite.runtime.quantized import REQUANT_TYPES, QuantEmbedding, QuantLinear, dequantize_rows
from llamalite.kernels.blocks import SUPPORTED
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 7, 128, 5]])


def _as_numpy(weights):
    return {k: v.numpy() for k, v in weights.items()}


def test_f32_gguf_logits_match_transformers(tmp_path):
    ref = tiny_hf_model()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128)
    lm = load(write_gguf(tmp_path / "tiny.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg))
    assert lm.format == "gguf"
    assert lm.config.norm_eps == pytest.approx(cfg.norm_eps)  # stored as float32
    assert dataclasses.replace(lm.config, norm_eps=cfg.norm_eps) == cfg
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref(TOKENS).logits, atol=1e-4, rtol=0)


def test_tied_gguf_has_no_output_tensor(tmp_path):
    ref = tiny_hf_model(tie_word_embeddings=True)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128, tie_embeddings=True)
    lm = load(write_gguf(tmp_path / "tied.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg))
    assert lm.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref(TOKENS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tensor_type", SUPPORTED)
def test_every_type_loads_as_the_gguf_package_dequantizes_it(tmp_path, tensor_type):
    # Rows of 256 so that the K-quants' super-blocks fit.
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512,
                      context_length=64)
    ref = tiny_hf_model(hidden_size=256, intermediate_size=512, max_position_embeddings=64)
    path = write_gguf(tmp_path / f"tiny-{tensor_type}.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg,
                      tensor_type=tensor_type)
    lm = load(path, quantized=False)
    expected_types = {tensor_type, "F32"}
    assert set(lm.tensor_types) == expected_types
    # The reference: the gguf package's own reader and dequantization of the same file.
    reference = {}
    for t in GGUFReader(path).tensors:
        values = gq.dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        reference[gguf_to_meta_name(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            tuple(int(d) for d in reversed(t.shape)))
    ours = lm.model.state_dict()
    for name, values in reference.items():
        torch.testing.assert_close(ours[name], values, rtol=0, atol=0, msg=name)
    expected_model = build_model(cfg, reference, torch.float32)
    with torch.no_grad():
        expected_logits = expected_model(TOKENS)
        torch.testing.assert_close(lm.model(TOKENS), expected_logits, rtol=0, atol=0)
    # The default load keeps Q4_0/Q4_1/Q8_0/Q4_K in their blocks: same weights, kernel arithmetic; Q5_0
    # becomes Q8_0 of the same values. Other lossy block types are re-quantized to Q8_0 (ggml's
    # rounding): within half a step (amax/127 per 32 weights) of them, plus the fp16 rounding of the
    # stored step (127 * 2^-11 of a step at most, and below fp16's normal range, 2^-25 of a unit: MXFP4's
    # scales reach far below it).
    fast = load(path).model
    requant = tensor_type in REQUANT_TYPES
    for name, values in reference.items():
        module = fast.get_submodule(name.removesuffix(".weight"))
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            weight = dequantize_rows(module.raw, module.type_name, module.packed)
            assert module.type_name == ("Q8_0" if requant or tensor_type == "Q5_0" else tensor_type)
        else:
            weight = module.weight
        if requant and values.dim() == 2:
            step = values.reshape(values.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            err = (weight - values).reshape(values.shape[0], -1, 32).abs()
            assert (err <= step * (0.5 + 127 / 2048) + 127 * 2.0 ** -25 + 1e-7).all(), name
        else:
            torch.testing.assert_close(weight, values, rtol=0, atol=0, msg=name)
    if tensor_type.endswith("_K"):
        return  # random blocks (see write_gguf): that model's logits are noise, its weights were checked
    with torch.no_grad():
        for n in (1, TOKENS.shape[1]):  # the fused kernel (few rows) and dequantize + GEMM (many)
            got, want = fast(TOKENS[:, :n]), expected_logits[:, :n]
            assert (got - want).abs().max() <= (2e-2 if requant else 1e-3) * want.abs().max()


def _small_gguf(tmp_path):
    ref = tiny_hf_model()
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128)
    return write_gguf(tmp_path / "tiny.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg)


def test_truncated_gguf_is_reported(tmp_path):
    path = _small_gguf(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|corrupt"):
            load(bad)


def test_corrupt_gguf_is_reported(tmp_path):
    path = _small_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:16] = (10**12).to_bytes(8, "little")  # an absurd tensor count
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not a readable GGUF file"):
        load(bad)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(not_gguf)


def test_unsupported_tensor_type_names_supported_ones(tmp_path):
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512,
                      context_length=64)
    ref = tiny_hf_model(hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    path = write_gguf(tmp_path / "q2k.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg, tensor_type="F32")
    # Rewrite one tensor as Q2_K, a type llamalite does not decode.
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q2k2.gguf"), "llama")
    reader = GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, vtype)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            n_el, n_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]
            raw = np.zeros((t.data.shape[0], t.data.shape[1] // n_el * n_bytes), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=GGMLQuantizationType.Q2_K)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match=r"blk.0.ffn_up.weight.*Q2_K is not supported \(supported: F32"):
        load(tmp_path / "q2k2.gguf")


def test_quantized_decode_steps_match_a_full_forward(tmp_path):
    """The one-token path (fused q/k/v and gate/up products, the attention op) against the plain forward."""
    from llamalite.runtime.quantized import FastAttention, FastFeedForward

    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512,
                      context_length=64)
    ref = tiny_hf_model(hidden_size=256, intermediate_size=512, max_position_embeddings=64)
    model = load(write_gguf(tmp_path / "q8.gguf", _as_numpy(meta_weights_from_hf(ref)), cfg, tensor_type="Q8_0")).model
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance(attention, FastAttention) and attention.qkv is not None
    assert isinstance(ffn, FastFeedForward) and ffn.w13 is not None
    with torch.no_grad():
        full = model(TOKENS)
        model.setup_caches(1, 32)
        steps = torch.cat([model(TOKENS[:, i:i + 1], torch.tensor([i])) for i in range(TOKENS.shape[1])], dim=1)
    assert (steps - full).abs().max() <= 1e-3 * full.abs().max()


def test_our_faster_metadata_parse_reads_what_the_gguf_package_reads(default_model_file, tmp_path):
    """open_gguf parses arrays of numbers as one view and strings as memoryview slices: every field's
    contents, and every tensor's name, type, shape and bytes, as the gguf package's own reader has them."""
    from llamalite.formats.gguf import gguf_metadata, open_gguf

    for path in (default_model_file, write_gguf(tmp_path / "tiny.gguf", {k: v.numpy() for k, v in
                                                 meta_weights_from_hf(tiny_hf_model()).items()},
                                                 ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                             vocab_size=400, hidden_dim=160))):
        ours, theirs = open_gguf(path), GGUFReader(path)
        assert gguf_metadata(ours) == {k: v.contents() for k, v in theirs.fields.items()}
        for a, b in zip(ours.tensors, theirs.tensors, strict=True):
            assert (a.name, a.tensor_type, a.shape.tolist(), a.data_offset) == \
                   (b.name, b.tensor_type, b.shape.tolist(), b.data_offset)
            assert np.array_equal(a.data, b.data)
