import json

import pytest
import torch

from llamalite.formats.load import ModelFileError, load

from llamalite.formats.build import build_model
from llamalite.model.config import ModelConfig
from llamalite.model.transformer import Transformer
from tests.helpers import meta_weights_from_hf, save_hf_dir, tiny_hf_model, train_sentencepiece

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 7, 128, 5, 64, 200]])

VARIANTS = {
    "gqa-untied": {},
    "gqa-tied": {"tie_word_embeddings": True},
    "mha": {"num_key_value_heads": 4},
    "llama3.1-rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_checkpoint_logits_match_transformers(tmp_path, variant):
    ref = tiny_hf_model(**VARIANTS[variant])
    lm = load(save_hf_dir(ref, tmp_path / "hf"))
    assert lm.format == "hf"
    with torch.no_grad():
        expected = ref(TOKENS).logits
        ours = lm.model(TOKENS)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def _cached_model(seed=0):
    ref = tiny_hf_model(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=128)
    return build_model(cfg, meta_weights_from_hf(ref), torch.float32)


def test_kv_cached_decode_equals_full_forward():
    model = _cached_model()
    with torch.no_grad():
        full = model(TOKENS)
        model.setup_caches(1, 64)
        steps = [model(TOKENS[:, i:i + 1], torch.tensor([i])) for i in range(TOKENS.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_shot():
    model = _cached_model()
    with torch.no_grad():
        model.setup_caches(1, 64)
        one_shot = model(TOKENS, torch.arange(12))
        model.setup_caches(1, 64)
        chunks = [model(TOKENS[:, a:b], torch.arange(a, b)) for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=1e-5, rtol=0)


def test_batched_cached_forward_equals_rows_alone():
    model = _cached_model()
    batch = torch.cat([TOKENS, TOKENS.flip(1)])
    with torch.no_grad():
        model.setup_caches(2, 32)
        both = model(batch, torch.arange(12))
        model.setup_caches(1, 32)
        first = model(batch[:1], torch.arange(12))
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=0)


def test_rows_at_different_positions_decode_together():
    """Continuous batching: two sequences of different lengths in cache rows 2 and 0 step together
    (per-row positions); each row equals its own full forward."""
    model = _cached_model()
    a, b = TOKENS[:, :9], TOKENS.flip(1)[:, :5]
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model.setup_caches(3, 32)
        model(a[:, :8], torch.arange(8), rows=torch.tensor([2]))
        model(b[:, :4], torch.arange(4), rows=torch.tensor([0]))
        step = model(torch.tensor([[a[0, 8]], [b[0, 4]]]), torch.tensor([[8], [4]]), rows=torch.tensor([2, 0]))
    torch.testing.assert_close(step[0, 0], full_a[0, 8], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], full_b[0, 4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_logits_match_transformers(tmp_path, shards):
    ref = tiny_hf_model()
    weights = meta_weights_from_hf(ref)
    # Split like Meta's model-parallel shards: columns of wq/wk/wv/w1/w3/output, rows of wo/w2,
    # embedding columns (LLaMA 1/2); norms replicated.
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    parts = [{} for _ in range(shards)]
    for name, t in weights.items():
        key = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
        dim = split_dim.get(key)
        pieces = t.chunk(shards, dim=dim) if dim is not None else [t] * shards
        for part, piece in zip(parts, pieces):
            part[name] = piece.clone()
    for i, part in enumerate(parts):
        torch.save(part, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400, "multiple_of": 32,
         "ffn_dim_multiplier": 0.9, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 128}))
    train_sentencepiece(tmp_path / "tokenizer.model")
    lm = load(tmp_path)
    assert lm.format == "meta" and lm.config.hidden_dim == 160
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref(TOKENS).logits, atol=1e-4, rtol=0)


class Payload:
    """Any non-tensor object in a checkpoint: unpickling it could run code."""


def test_meta_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(3), "evil": Payload()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 400}))
    train_sentencepiece(tmp_path / "tokenizer.model")
    with pytest.raises(ModelFileError, match="cannot be read as a Meta checkpoint"):
        load(tmp_path)


def test_wrong_tensor_shape_is_named(tmp_path):
    ref = tiny_hf_model()
    path = save_hf_dir(ref, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"feed_forward.w1.weight' has shape \(160, 64\) but the config "
                                             r"expects \(128, 64\)"):
        load(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match="no model at"):
        load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="neither config.json"):
        load(tmp_path / "empty")
    hf = save_hf_dir(tiny_hf_model(), tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        load(hf)


def test_training_forward_and_loss_are_differentiable():
    from llamalite.model.transformer import cross_entropy_loss

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, hidden_dim=64))
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randint(0, 50, (2, 9))
    loss = cross_entropy_loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=0.1)
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0
