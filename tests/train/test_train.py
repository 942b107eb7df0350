"""Pretraining: data preparation, the loop, exact resume after SIGKILL, recovery from a cut-off
checkpoint, and the errors for bad setups."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamalite.train.data import DataError, TokenData, prepare
from llamalite.train.loop import TrainConfig, TrainError, lr_at, train

TEXT = ("In the beginning was the word, and the word was with the model. " * 3 + "\n\n"
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n\n") * 40

TINY = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, seq_len=32, batch_size=4, warmup=2, lr=3e-3,
            eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(TEXT)
    (root / "b.jsonl").write_text("".join(json.dumps({"text": f"Record {i}: " + TEXT[:300]}) + "\n" for i in range(20)))
    prepare([root], None, root / "prep", train_tokenizer_vocab=320, val_every=5, progress=False)
    return root / "prep"


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_prepare_writes_shards_that_decode_to_the_corpus(prepared, tmp_path, default_model_file):
    index = json.loads((prepared / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 320
    assert index["train"]["tokens"] > 0 and index["val"]["tokens"] > 0
    assert TokenData.open(prepared, "train").tokens == index["train"]["tokens"]
    # with a real model's tokenizer, a file becomes BOS + exactly its encoding
    from llamalite.formats.load import load_tokenizer

    tok = load_tokenizer(default_model_file)
    (tmp_path / "one.md").write_text("# Title\n\nSome *Markdown* text.\n")
    prepare([tmp_path / "one.md"], tok, tmp_path / "p2", progress=False)
    ids = np.concatenate([np.fromfile(tmp_path / "p2" / f"{s}-00000.bin", dtype=np.uint16) for s in ("train", "val")])
    expected = tok.encode("# Title\n\nSome *Markdown* text.\n", add_bos=False, parse_special=False)
    assert ids.tolist() == ([tok.bos_id] if tok.bos_id is not None else []) + expected + (
        [tok.eos_id] if tok.bos_id is None else [])


def test_prepare_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        prepare([tmp_path / "empty.txt"], None, tmp_path / "out", train_tokenizer_vocab=300, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'text'"):
        prepare([tmp_path / "bad.jsonl"], None, tmp_path / "out2", train_tokenizer_vocab=300, progress=False)
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "missing.txt"], None, tmp_path / "out3", train_tokenizer_vocab=300)
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData.open(tmp_path, "train")


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_train_five_steps(prepared, tmp_path):
    result = train(TrainConfig(data=str(prepared), out=str(tmp_path / "run"), steps=5, eval_every=5, save_every=5,
                               **TINY))
    assert result["steps"] == 5 and result["val_loss"] is not None
    assert len(_losses(tmp_path / "run")) == 5
    assert (tmp_path / "run" / "ckpt-0000005.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overfitting_one_batch_drives_the_loss_near_zero(tmp_path):
    from llamalite.train.data import train_tokenizer

    tok = train_tokenizer([_write(tmp_path / "t.txt", TEXT)], 300, tmp_path / "tok")
    one = " ".join(f"w{i}" for i in range(40))
    prep = tmp_path / "one"  # the same text twice: one window to train on, the same to validate on
    prepare([_write(tmp_path / "1.txt", one), _write(tmp_path / "2.txt", one)], tok, prep, val_every=2,
            progress=False)
    n = TokenData.open(prep, "train").tokens
    assert TokenData.open(prep, "val").tokens == n
    cfg = TrainConfig(data=str(prep), out=str(tmp_path / "run"), steps=150, eval_every=150, save_every=150,
                      **{**TINY, "seq_len": n - 1, "lr": 1e-2, "warmup": 10, "weight_decay": 0.0})
    result = train(cfg)
    assert result["loss"] < 0.05, result


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _cli_train(prepared, out, steps, *extra):
    return [sys.executable, "-m", "llamalite", "train", "--data", str(prepared), "--out", str(out), "--threads", "1",
            "--steps", str(steps), "--eval-every", "10", "--save-every", "10", "--dim", "32", "--n-layers", "2",
            "--n-heads", "4", "--hidden-dim", "64", "--seq-len", "32", "--batch-size", "4", "--warmup", "2",
            "--lr", "3e-3", "--eval-batches", "2", "--no-progress", *extra]


def test_a_run_killed_and_resumed_equals_the_uninterrupted_run(prepared, tmp_path):
    subprocess.run(_cli_train(prepared, tmp_path / "straight", 60), check=True, capture_output=True)
    # The same run, SIGKILLed once its step-30 checkpoint exists (it may have logged more steps), resumed.
    proc = subprocess.Popen(_cli_train(prepared, tmp_path / "killed", 60), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "ckpt-0000030.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its step-30 checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cli_train(prepared, tmp_path / "killed", 60, "--resume"), check=True, capture_output=True)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert len(straight) == 60 and resumed == straight  # step for step, bit for bit
    # a checkpoint cut off mid-write is detected, and the one before it is used
    ckpts = sorted((tmp_path / "killed").glob("ckpt-*.pt"))
    latest = ckpts[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    run = subprocess.run(_cli_train(prepared, tmp_path / "killed", 60, "--resume"), capture_output=True, text=True)
    assert run.returncode == 0 and "unreadable" in run.stderr and "ckpt-0000050.pt" in run.stderr
    assert _losses(tmp_path / "killed") == straight


def test_bad_setups_are_refused_with_the_fix(prepared, tmp_path):
    base = dict(data=str(prepared), steps=4, eval_every=2, save_every=2, **TINY)
    train(TrainConfig(out=str(tmp_path / "a"), **base))
    with pytest.raises(TrainError, match="--resume"):
        train(TrainConfig(out=str(tmp_path / "a"), **base))  # would overwrite checkpoints
    with pytest.raises(TrainError, match="different model .*dim"):
        train(TrainConfig(out=str(tmp_path / "a"), resume=True, **{**base, "dim": 64}))
    other = tmp_path / "other"
    prepare([_write(tmp_path / "o.txt", TEXT)], None, other, train_tokenizer_vocab=330, progress=False)
    with pytest.raises(TrainError, match="another tokenizer|different model"):
        train(TrainConfig(out=str(tmp_path / "a"), resume=True, **{**base, "data": str(other)}))
    with pytest.raises(TrainError, match=r"needs about [\d.]+ GiB"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**base, "dim": 8192, "n_layers": 64, "n_heads": 64,
                                                      "hidden_dim": 32768}))
    with pytest.raises(DataError, match="fewer than one window"):
        train(TrainConfig(out=str(tmp_path / "c"), **{**base, "seq_len": 10 ** 6}))
    with pytest.raises(TrainError, match="no training data"):
        train(TrainConfig(out=str(tmp_path / "d")))


def test_yaml_config_and_flags(prepared, tmp_path):
    import yaml

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": str(prepared), "out": str(tmp_path / "y"), "steps": 3,
                                        "eval_every": 3, "save_every": 3, **TINY}))
    run = subprocess.run([sys.executable, "-m", "llamalite", "train", "--config", str(cfg_file), "--steps", "2",
                          "--eval-every", "2", "--save-every", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stderr.strip().splitlines()[-1])["steps"] == 2  # the flag overrides the file
    cfg_file.write_text("steps: 3\nbogus: 1\n")
    run = subprocess.run([sys.executable, "-m", "llamalite", "train", "--config", str(cfg_file)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "unknown field(s) bogus" in run.stderr


def test_parameter_count_without_building_the_model():
    from llamalite.model.config import ModelConfig
    from llamalite.model.transformer import Transformer
    from llamalite.train.loop import count_parameters

    for cfg in (ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96),
                ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=50, tie_embeddings=True)):
        unique = {p.data_ptr(): p for p in Transformer(cfg).parameters()}.values()  # tied weights once
        assert count_parameters(cfg) == sum(p.numel() for p in unique)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path, parallel):
    """torchrun with 2 CPU processes (gloo), batch 4 each, against 1 process with batch 8."""
    def losses(out, cmd):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return _losses(out)

    one = losses(tmp_path / "one", _cli_train(prepared, tmp_path / "one", 20, "--batch-size", "8"))
    two = losses(tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", *_cli_train(prepared, tmp_path / "two", 20, "--parallel", parallel)[1:]])
    assert len(one) == len(two) == 20
    for (s1, l1, v1), (s2, l2, v2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)
        assert (v1 is None) == (v2 is None) and (v1 is None or v1 == pytest.approx(v2, abs=1e-4))
