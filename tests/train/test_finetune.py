"""Fine-tuning: what is learned from each record kind, a LoRA fine-tune of the default model that
lowers held-out loss and changes its answers as intended (and survives export to quantized GGUF),
exact resume on the shared loop, full fine-tuning, and the errors for bad records."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamalite.text.chat_template import render_chat
from llamalite.cli.main import main
from llamalite.train.config import FinetuneConfig
from llamalite.train.data import DataError
from llamalite.train.finetune import collate, encode_record, finetune, load_finetuned, read_records
from llamalite.generation.tokens import generate
from llamalite.generation.sampling import SamplingParams
from tests.helpers import save_hf_dir, tiny_hf_model

PEMBERTON = Path(__file__).parent.parent.parent / "examples" / "finetune" / "pemberton.jsonl"
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                     {"role": "assistant", "content": "Rome."}]}


def _learned(ex) -> list[int]:
    return [t for t, learn in zip(ex.ids, ex.learn) if learn]


def test_chat_records_learn_only_the_assistant_turns(default_lm):
    tok, template = default_lm.tokenizer, default_lm.chat_template
    ex = encode_record(CHAT, tok, template)
    whole = render_chat(template, tok, CHAT["messages"], add_generation_prompt=False)
    # the pieces put together are the conversation's own encoding (ChatML's turns end in special tokens)
    assert ex.ids == tok.encode(whole, add_bos=False, parse_special=True)
    end = "<|im_end|>\n"
    assert _learned(ex) == tok.encode("Paris." + end, add_bos=False) + tok.encode("Rome." + end, add_bos=False)
    # the prompt before the first reply is what inference encodes for it
    prompt = render_chat(template, tok, CHAT["messages"][:2], add_generation_prompt=True)
    n = len(tok.encode(prompt, add_bos=False))
    assert ex.ids[:n] == tok.encode(prompt, add_bos=False) and not any(ex.learn[:n]) and ex.learn[n]


def test_prompt_completion_and_text_records(default_lm):
    tok = default_lm.tokenizer
    ex = encode_record({"prompt": "Q: two plus two?\nA:", "completion": " four"}, tok, None)
    assert _learned(ex) == tok.encode(" four", add_bos=False, parse_special=False) + [tok.eos_id]
    assert ex.ids[:len(ex.ids) - len(_learned(ex))] == tok.encode("Q: two plus two?\nA:", parse_special=False)
    ex = encode_record({"text": "All of this is learned."}, tok, None)
    assert all(ex.learn) and ex.ids[-1] == tok.eos_id
    x, y = collate([ex, encode_record({"text": "Short."}, tok, None)], pad_id=0, device="cpu")
    assert x.shape == y.shape == (2, len(ex.ids) - 1)
    assert y[0].tolist() == ex.ids[1:] and (y[1] == -100).sum() == len(ex.ids) - len(tok.encode("Short.")) - 1


def test_bad_records_name_the_line(default_lm, tmp_path):
    tok, template = default_lm.tokenizer, default_lm.chat_template
    cases = {'{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
             '{"messages": "hello"}': "'messages' must be a list",
             '{"prompt": "p"}': "needs both",
             '{"title": "x"}': "needs 'messages'",
             '[1, 2]': "not a JSON object",
             '{"text": "ok"': "not valid JSON"}
    for line, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "fine"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2.*{message}"):
            read_records(path, tok, template, seq_len=64)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl", tok, template, seq_len=64)


def _answer(model, tok, template, question: str) -> str:
    prompt = tok.encode(render_chat(template, tok, [{"role": "user", "content": question}]), add_bos=False)
    ids = list(generate(model, prompt, max_new_tokens=24, sampling=SamplingParams(temperature=0), stop_ids=tok.end_ids))
    return tok.decode(ids)


def test_lora_finetune_lowers_held_out_loss_and_teaches_the_answer(default_lm, default_lm_exact, tmp_path):
    """25 chat records teach the assistant its name; every 5th is held out (questions it never sees)."""
    from llamalite.formats.export import export_gguf
    from llamalite.train.lora import lora_kept
    from llamalite.train.restore import load_for_export
    from llamalite.train.lora import merge_lora
    from llamalite.train.finetune import _split
    from llamalite.formats.load import load
    from llamalite.train.loop import evaluate

    import contextlib

    cfg = FinetuneConfig(data=str(PEMBERTON), out=str(tmp_path / "run"), val_every=5, steps=30, batch_size=4, lr=1e-3,
                         eval_every=10, save_every=10, lora_dropout=0.0, progress=False)
    tok, template = default_lm.tokenizer, default_lm.chat_template
    _, held_out = _split(cfg, tok, template)
    held_questions = [json.loads(line)["messages"][0]["content"]
                      for i, line in enumerate(PEMBERTON.read_text().splitlines()) if i % 5 == 4]
    base_loss = evaluate(default_lm_exact.model, [collate(held_out, tok.eos_id, "cpu")], "cpu", contextlib.nullcontext)
    base_answers = [_answer(default_lm_exact.model, tok, template, q) for q in held_questions]

    result = finetune(cfg)
    assert result["train_records"] == 20 and result["val_records"] == 5
    assert result["trainable"] < 0.01 * result["parameters"]
    assert result["val_loss"] < 0.3 * base_loss, (base_loss, result["val_loss"])
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "best.pt").exists()

    model, tokenizer, _ = load_for_export(cfg.out, merge=False)
    # re-quantized to the base's own Q4_1 grid, the small update rounds back to the base; Q8_0 keeps it
    assert lora_kept(model, "q8_0") > 0.95 and lora_kept(model, "q4_1") < 0.5
    merge_lora(model)
    tuned = [_answer(model, tok, template, q) for q in held_questions]
    for before, after in zip(base_answers, tuned):
        assert "Pemberton" not in before and "Pemberton" in after, (before, after)
    # exported quantized again, it still answers the intended way
    quantized = load(export_gguf(model, tokenizer, tmp_path / "tuned.gguf", "q8_0"))
    assert "Pemberton" in _answer(quantized.model, quantized.tokenizer, quantized.chat_template, held_questions[0])
    # and served unmerged on the Q4_1 base itself (where a merged Q4_1 export loses the update), as
    # `--lora` runs it: the run directory, no export
    from llamalite.runtime.adapters import AdapterSet
    from llamalite.formats.adapters import read_adapter

    served = load(default_lm.path)
    adapters = AdapterSet(served.model)
    adapters.route_all(adapters.add("pemberton", read_adapter(cfg.out, served.model.config, served.path)))
    assert all("Pemberton" in _answer(served.model, tok, template, q) for q in held_questions[:2])


def test_finetune_resumes_exactly(tmp_path):
    base = save_hf_dir(tiny_hf_model(), tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i * 7} and more"}) + "\n"
                            for i in range(12)))
    common = dict(model=str(base), data=str(data), steps=6, batch_size=3, lr=1e-2, eval_every=2, save_every=2,
                  val_every=4, lora_rank=4, lora_dropout=0.1, progress=False)
    finetune(FinetuneConfig(out=str(tmp_path / "straight"), keep=5, **common))
    # a run killed in step 3: only its step-2 checkpoint and the log up to there survive
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    for name in ("ckpt-0000004.pt", "ckpt-0000006.pt", "best.pt"):
        (tmp_path / "cut" / name).unlink()
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    finetune(FinetuneConfig(out=str(tmp_path / "cut"), resume=True, **common))

    def curve(run):
        return [(r["step"], r["loss"], r.get("val_loss")) for r in
                map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert curve("cut") == curve("straight")
    # the CLI writes the trained adapter alone, in PEFT's layout
    assert main(["export", str(tmp_path / "cut"), "--to", "adapter", "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(ValueError, match="another LoRA setup"):
        finetune(FinetuneConfig(out=str(tmp_path / "cut"), resume=True, **{**common, "lora_rank": 8}))


def test_full_finetune_trains_every_weight(tmp_path, capsys):
    base = save_hf_dir(tiny_hf_model(), tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the corpus"}) + "\n" for i in range(8)))
    result = finetune(FinetuneConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), full=True, steps=3,
                                     batch_size=2, lr=1e-2, save_every=3, val_every=0, progress=False))
    assert result["trainable"] == result["parameters"] and result["val_loss"] is None
    ckpt = torch.load(tmp_path / "run" / "ckpt-0000003.pt", weights_only=True)
    model, _ = load_finetuned(ckpt)
    from llamalite.formats.load import load

    original = load(base).model
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert "layers.0.attention.wq.weight" in changed and "norm.weight" in changed
    assert main(["export", str(tmp_path / "run"), "--to", "adapter", "--out", str(tmp_path / "a")]) == 1
    assert "not a LoRA fine-tune" in capsys.readouterr().err


def test_finetune_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    base = save_hf_dir(tiny_hf_model(), tmp_path / "base")
    with pytest.raises(ValueError, match="unknown LoRA target.*wz"):
        finetune(FinetuneConfig(model=str(base), data=str(data), out=str(tmp_path / "a"), targets="wq,wz", progress=False))
    with pytest.raises(ValueError, match="no training data"):
        finetune(FinetuneConfig(model=str(base), out=str(tmp_path / "b"), progress=False))
    with pytest.raises(FileNotFoundError, match="no model"):
        finetune(FinetuneConfig(model=str(tmp_path / "nothing"), data=str(data), out=str(tmp_path / "c"), progress=False))
    with pytest.raises(ValueError, match="unknown field.*dim"):
        (tmp_path / "f.yaml").write_text("dim: 64\n")
        FinetuneConfig.from_yaml(tmp_path / "f.yaml")
