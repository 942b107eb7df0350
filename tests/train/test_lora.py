"""LoRA: starts equal to the base, merged equals unmerged, only the adapter trains, and PEFT loads the
adapter onto transformers' model of the Hugging Face export with the same logits."""

import pytest
import torch

from llamalite.formats.export import export_hf
from llamalite.formats.load import load
from llamalite.train.lora import LoRALinear, apply_lora, lora_layers, merge_lora, save_adapter
from llamalite.model.transformer import cross_entropy_loss
from tests.helpers import save_hf_dir, tiny_hf_model

IDS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 7, 128, 5, 64, 200]])


def _tiny(tmp_path):
    return load(save_hf_dir(tiny_hf_model(), tmp_path / "base"))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_layers(model):
            m.lora_b.normal_(0, 0.05, generator=g)


def test_lora_starts_at_the_base_and_merges_exactly(tmp_path):
    lm = _tiny(tmp_path)
    with torch.no_grad():
        base = lm.model(IDS)
    apply_lora(lm.model, rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS), base, atol=0, rtol=0)  # B = 0: not a bit of change
        _randomize(lm.model)
        unmerged = lm.model(IDS)
        assert (unmerged - base).abs().max() > 1e-3
        merge_lora(lm.model)
        assert not lora_layers(lm.model)
        torch.testing.assert_close(lm.model(IDS), unmerged, atol=1e-5, rtol=0)


def test_only_the_adapter_trains(tmp_path):
    lm = _tiny(tmp_path)
    model = apply_lora(lm.model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = cross_entropy_loss(model(IDS[:, :-1]), IDS[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_peft_loads_the_adapter_onto_the_hf_export(tmp_path):
    peft = pytest.importorskip("peft", reason="the test extras install peft")
    from transformers import LlamaForCausalLM

    lm = _tiny(tmp_path)
    export_hf(lm.model, lm.tokenizer, tmp_path / "hf")
    apply_lora(lm.model, rank=4, alpha=8, targets=("wq", "wk", "wv", "w2"))
    _randomize(lm.model)
    save_adapter(lm.model, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    ref = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, lm.model(IDS), atol=1e-4, rtol=0)


def test_lora_refuses_what_it_cannot_wrap(default_lm):
    with pytest.raises(TypeError, match="quantized=False"):
        LoRALinear(default_lm.model.layers[0].attention.wq)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(torch.nn.Module(), targets=("wx",))


def test_gradients_through_a_loaded_model_match_the_reference(default_model_file):
    """The kernel-backed layers a loader swaps in must not break backward (fine-tuning a loaded model)."""
    fast = load(default_model_file, quantized=False)
    ids = torch.tensor([[1, 502, 3054, 314, 4649, 30, 198, 504]])
    from llamalite.runtime.quantized import FastRMSNorm

    assert any(isinstance(m, FastRMSNorm) for m in fast.model.modules())
    loss = cross_entropy_loss(fast.model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    g = fast.model.layers[0].attention.wq.weight.grad
    ref = load(default_model_file, quantized=False)
    for m in list(ref.model.modules()):  # the plain model.py modules
        for name, child in list(m.named_children()):
            if isinstance(child, FastRMSNorm):
                plain = torch.nn.Module.__new__(__import__("llamalite.model.transformer", fromlist=["RMSNorm"]).RMSNorm)
                torch.nn.Module.__init__(plain)
                plain.eps, plain.weight = child.eps, child.weight
                setattr(m, name, plain)
    cross_entropy_loss(ref.model(ids[:, :-1]), ids[:, 1:]).backward()
    torch.testing.assert_close(g, ref.model.layers[0].attention.wq.weight.grad, atol=1e-6, rtol=1e-4)
