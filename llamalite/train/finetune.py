"""Fine-tuning a model llamalite loads, on the pretraining loop (`train.run`: progress bar,
metrics.jsonl, loss.png, atomic checkpoints, exact resume). A LoRA adapter is trained by default
(`full` trains every weight); quantized GGUF blocks are dequantized to fp32 for training, and
`llamalite export` writes the result merged (GGUF, quantized again if asked, or Hugging Face) or as
the bare adapter in PEFT's layout.

Records, one JSON object a line:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
        rendered with the model's chat template; only the assistant turns are learned (their text and
        the template's end-of-turn marker), the prompt around them is context
    {"prompt": ..., "completion": ...}   plain text: the completion and EOS are learned
    {"text": ...}                        plain text: all of it and EOS are learned

Each piece is tokenized as inference will see it: the prompt up to an assistant turn is encoded
on its own, as a chat prompt is, and the turn after it (what the model will generate).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..text.tokenizer import Tokenizer
from .config import FinetuneConfig
from .data import DataError, read_jsonl
from .loop import Job, TrainError, check_memory, check_sizes, draw, estimate_memory, run, setup_distributed

IGNORE = -100  # the target of a position whose next token is not learned


@dataclass
class Example:
    ids: list[int]  # the whole token sequence
    learn: list[bool]  # per token: whether predicting it is trained


def chat_segments(template: str | None, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an assistant turn) pieces, in order. Each assistant
    turn is what follows the prompt the template renders for it (add_generation_prompt), which
    must be a prefix of the conversation rendered through that turn."""
    from ..text.chat_template import render_chat

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = render_chat(template, tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(template, tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise DataError("the chat template does not render this conversation as a growing prefix (it rewrites "
                            "earlier turns), so assistant turns cannot be told apart: give prompt/completion records")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    whole = render_chat(template, tokenizer, messages, add_generation_prompt=False)
    if whole[len(done):]:
        pieces.append((whole[len(done):], False))
    return [(text, learn) for text, learn in pieces if text]


def encode_record(record: dict, tokenizer: Tokenizer, template: str | None) -> Example:
    """One record's tokens and which of them are learned (see the module docstring)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                           ("system", "user", "assistant", "tool") for m in messages)):
            raise ValueError("'messages' must be a list of {\"role\": system|user|assistant, \"content\": str}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant turn to learn")
        ids, learn = [], []
        for text, is_reply in chat_segments(template, tokenizer, messages):
            piece = tokenizer.encode(text, add_bos=False, parse_special=True)
            ids += piece
            learn += [is_reply] * len(piece)
        return Example(ids, learn)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError("a prompt/completion record needs both as strings, the completion not empty")
        head = tokenizer.encode(prompt, parse_special=False)
        tail = tokenizer.encode(completion, add_bos=False, parse_special=False) + eos
        return Example(head + tail, [False] * len(head) + [True] * len(tail))
    if isinstance(record.get("text"), str) and record["text"]:
        ids = tokenizer.encode(record["text"], parse_special=False) + eos
        return Example(ids, [True] * len(ids))
    raise ValueError("a record needs 'messages', 'prompt' and 'completion', or 'text'")


def read_records(path: str | Path, tokenizer: Tokenizer, template: str | None, seq_len: int) -> list[Example]:
    """Every record of a JSONL file, encoded and cut to seq_len + 1 tokens; records with nothing left
    to learn after the cut are dropped (and counted on stderr)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no such file: {path} (fine-tuning reads a JSONL file of records)")
    examples, cut, dropped = [], 0, 0
    for n, record in read_jsonl(path):
        try:
            ex = encode_record(record, tokenizer, template)
        except ValueError as e:
            raise DataError(f"{path}:{n}: {e}") from e
        if len(ex.ids) > seq_len + 1:
            cut += 1
            ex = Example(ex.ids[:seq_len + 1], ex.learn[:seq_len + 1])
        if not any(ex.learn[1:]):
            dropped += 1
            continue
        examples.append(ex)
    if cut or dropped:
        print(f"llamalite: {path}: {cut} records cut to seq_len + 1 = {seq_len + 1} tokens, {dropped} dropped with "
              f"nothing left to learn (raise --seq-len to keep them)", file=sys.stderr)
    if not examples:
        raise DataError(f"{path} holds no records to learn from")
    return examples


def collate(examples: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets padded to the longest example; padding and unlearned tokens are not scored
    (right padding never reaches the real tokens under the causal mask)."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        x[i, :n] = torch.tensor(e.ids[:-1])
        y[i, :n] = torch.tensor([t if learn else IGNORE for t, learn in zip(e.ids[1:], e.learn[1:])])
    return x.to(device), y.to(device)


def fingerprint(examples: Sequence[Example]) -> str:
    """A hash of the encoded records: a resumed run must see the same tokens."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.learn]).encode())
    return h.hexdigest()[:16]


def _split(cfg: FinetuneConfig, tokenizer: Tokenizer, template: str | None):
    examples = read_records(cfg.data, tokenizer, template, cfg.seq_len)
    if cfg.val_data:
        return examples, read_records(cfg.val_data, tokenizer, template, cfg.seq_len)
    if cfg.val_every < 2 or len(examples) < cfg.val_every:  # too few records to hold any out
        return examples, []
    held = set(range(cfg.val_every - 1, len(examples), cfg.val_every))
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def lora_setup(cfg: FinetuneConfig) -> dict | None:
    if cfg.full:
        return None
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": targets}


def prepare_model(base: str | Path, lora: dict | None, seed: int = 0, device: str | torch.device = "cpu"):
    """The base model dense in fp32 (quantized blocks dequantized) with LoRA applied, or every weight
    trainable; returns the LoadedModel."""
    from ..formats.load import load
    from .lora import apply_lora

    lm = load(base, dtype=torch.float32, quantized=False)
    lm.model.to(device)
    if lora is None:
        lm.model.requires_grad_(True)
    else:
        apply_lora(lm.model, lora["rank"], lora["alpha"], lora["targets"], lora["dropout"], seed)
    return lm


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume fine-tuning) cfg.model on cfg.data; returns the loop's summary."""
    from ..formats.store import resolve_model

    if not cfg.data:
        raise TrainError("no training data: set data to a JSONL file of records (messages, prompt/completion or text)")
    check_sizes(cfg)
    rank, world, device = setup_distributed(cfg)
    base = resolve_model(cfg.model or None).resolve()  # absolute: export may run from another directory
    lora = lora_setup(cfg)
    try:
        lm = prepare_model(base, lora, cfg.seed, device)
    except ValueError as e:  # a bad target list, rank, ...
        raise TrainError(str(e)) from None
    train_set, val_set = _split(cfg, lm.tokenizer, lm.chat_template)
    model = lm.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_memory(cfg, device, estimate_memory(model.config, cfg, n_params, n_trainable), n_params)
    pad = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else 0

    def batch(gen: torch.Generator, rank: int, world: int):
        return collate([train_set[k] for k in draw(len(train_set), gen, cfg.batch_size, rank, world)], pad, device)

    def val_batches(rank: int, world: int):
        step = cfg.batch_size * world
        for start in range(0, len(val_set), step):
            mine = val_set[start:start + step][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            if mine:
                yield collate(mine, pad, device)

    if rank == 0:
        what = "every weight" if lora is None else f"LoRA rank {lora['rank']} on {','.join(lora['targets'])}"
        print(f"llamalite: fine-tuning {base.name} ({what}: {n_trainable / 1e6:.2f}M of {n_params / 1e6:.1f}M "
              f"parameters) on {len(train_set)} records, {len(val_set)} held out", file=sys.stderr)
    job = Job(model, batch, val_batches if val_set else None,
              identity={"model_config": model.config.to_dict(), "data": fingerprint(train_set), "base": str(base),
                        "lora": lora},
              info={"finetune": {"base": str(base), "lora": lora}})
    summary = run(cfg, job, rank, world, device)
    return {**summary, "train_records": len(train_set), "val_records": len(val_set)}


def load_finetuned(ckpt: dict):
    """(model, tokenizer) of a fine-tuning checkpoint: its base with the trained weights (LoRA layers
    left unmerged: `lora.merge_lora` folds them in, `lora.save_adapter` writes them alone)."""
    setup = ckpt["finetune"]
    base = Path(setup["base"])
    if not base.exists():
        raise FileNotFoundError(f"the base model {base} of this fine-tune is gone: the checkpoint holds only what "
                                f"training changed, so put the base back at that path")
    lm = prepare_model(base, setup["lora"])
    missing, unexpected = lm.model.load_state_dict(ckpt["model"], strict=False)
    trained = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise ValueError(f"the checkpoint does not fit its base model {base} (missing {sorted(trained & set(missing))[:3]}, "
                         f"unexpected {unexpected[:3]})")
    lm.model.requires_grad_(False)
    return lm.model.eval(), lm.tokenizer
