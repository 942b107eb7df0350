"""The prompt cache on disk (--prompt-cache DIR): a prefix saved by one process is restored by the next
with the keys and values a prefill computes, for each KV type; the longest matching prefix is used;
the directory stays within its size, least recently used first; a damaged entry, another model's entry
and a write killed half way are each skipped and never restored; and a restarted server answers a
resent conversation from it."""

import os
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from llamalite.model.config import ModelConfig
from llamalite.model.transformer import KV_TYPES
from llamalite.generation.prompt_cache import PromptCache, model_key, parse_size, read_header
from llamalite.kernels.ops import kernels_available
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

IDS = [int(x) for x in np.random.default_rng(0).integers(5, 390, 200)]
TYPES = [k for k in KV_TYPES if k != "q8_0" or kernels_available()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model (head_dim 32, as q8_0 caches need) on the quantized kernels, context 256."""
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                      context_length=256)
    weights = {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model(hidden_size=128)).items()}
    return write_gguf(tmp_path_factory.mktemp("pc") / "tiny.gguf", weights, cfg, tensor_type="Q8_0")


def _prefill(model, ids, kind):
    model.setup_caches(1, 256, kind)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)[0, -1]
    return logits, [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]


def _saved(lm, directory, ids, kind="f16"):
    """A process's entry of `ids` in `directory`: prefilled, saved, written (the cache closed)."""
    _prefill(lm.model, ids, kind)
    cache = PromptCache(directory, model_key(lm))
    assert cache.save(lm.model, ids)
    cache.close()


def _next_logits(model, ids, at):
    with torch.inference_mode():
        return model(torch.tensor([ids[at:]]), torch.arange(at, len(ids)), last_only=True)[0, -1]


@pytest.mark.parametrize("kind", TYPES)
def test_a_saved_prefix_comes_back_as_computed(tiny, tmp_path, kind):
    """Saved by one cache object, restored by another (as after a restart) into a fresh cache: the
    restored positions hold the saved bytes, and the logits after computing the rest of the prompt
    equal those of a prefill of the whole prompt."""
    from llamalite.formats.load import load

    lm = load(tiny)
    model = lm.model
    want, caches = _prefill(model, IDS[:150], kind)
    writer = PromptCache(tmp_path, model_key(lm))
    assert writer.save(model, IDS[:150])
    writer.close()

    reader = PromptCache(tmp_path, model_key(lm))
    model.setup_caches(1, 256, kind)
    entry, n = reader.lookup(model, IDS[:150])
    assert n == 150 and len(entry.tokens) == 150
    assert reader.restore(model, entry, 149)  # the last position is computed, for its logits
    for layer, (k, v) in zip(model.layers, caches):
        assert torch.equal(layer.attention.cache.k[:, :, :149], k[:, :, :149])
        assert torch.equal(layer.attention.cache.v[:, :, :149], v[:, :, :149])
        assert not layer.attention.cache.k[:, :, 149:].any()  # nothing past what was asked for
    torch.testing.assert_close(_next_logits(model, IDS[:150], 149), want, rtol=1e-4, atol=1e-4)
    reader.close()


def test_the_longest_prefix_of_the_right_type_is_used(tiny, tmp_path):
    """Of two entries the one sharing more of the prompt; a prompt that departs from an entry part way
    gets that entry's prefix only; an entry of another KV type is left for runs with that type; an
    entry extended by a later save (a conversation's next turn) is replaced by it."""
    from llamalite.formats.load import load

    lm = load(tiny)
    model = lm.model
    cache = PromptCache(tmp_path, model_key(lm))
    for ids, kind in ((IDS[:100], "f16"), (IDS[:70] + [7] * 60, "f16"), (IDS[:180], "f32")):
        _prefill(model, ids, kind)
        cache.save(model, ids)
        cache.flush()
    model.setup_caches(1, 256, "f16")
    entry, n = cache.lookup(model, IDS[:90] + [9] * 20)
    assert n == 90 and list(entry.tokens) == IDS[:100]
    entry, n = cache.lookup(model, IDS[:70] + [7] * 80)
    assert n == 130 and len(entry.tokens) == 130
    model.setup_caches(1, 256, "f32")
    assert cache.lookup(model, IDS[:150])[1] == 150
    model.setup_caches(1, 256, "bf16")
    assert cache.lookup(model, IDS[:150]) == (None, 0)

    _prefill(model, IDS[:160], "f16")  # extends the 100-token f16 entry: that one goes
    cache.save(model, IDS[:160])
    cache.flush()
    lengths = sorted((e.kind, len(e.tokens)) for e in cache.entries.values())
    assert lengths == [("f16", 130), ("f16", 160), ("f32", 180)]
    assert len(list(tmp_path.glob("*.llkv"))) == 3
    # a prompt an entry already covers is not written again
    assert not cache.save(model, IDS[:120])
    cache.close()


def test_least_recently_used_entries_go_first(tiny, tmp_path):
    from llamalite.formats.load import load

    lm = load(tiny)
    model = lm.model
    prompts = [[k] + IDS[:99] for k in (1, 2, 3)]
    _prefill(model, prompts[0], "f16")
    one = 2 * 2 * 2 * 100 * 32 * 2  # layers x (k, v) x heads x positions x head_dim x bytes
    cache = PromptCache(tmp_path, model_key(lm), max_bytes=int(2.5 * (one + 2000)))
    for ids in prompts[:2]:
        _prefill(model, ids, "f16")
        cache.save(model, ids)
        cache.flush()
    first = cache.lookup(model, prompts[0])[0]
    old = first.path.stat().st_mtime_ns
    os.utime(cache.lookup(model, prompts[1])[0].path, ns=(old - 10**9, old - 10**9))  # the second is older now
    assert cache.restore(model, first, 50)  # and using the first makes it the newest
    _prefill(model, prompts[2], "f16")
    cache.save(model, prompts[2])
    cache.flush()
    assert sorted(int(e.tokens[0]) for e in cache.entries.values()) == [1, 3]
    assert len(list(tmp_path.glob("*.llkv"))) == 2
    # a prompt bigger than the whole cache is not saved, and says why once
    with pytest.warns(UserWarning, match="more than the cache"):
        small = PromptCache(tmp_path / "small", model_key(lm), max_bytes=one // 2)
        assert not small.save(model, prompts[2])
    small.close()
    cache.close()


def test_damaged_and_foreign_entries_are_skipped(tiny, tmp_path):
    """A flipped byte fails the checksum at restore; a cut-short file and a stray file fail at the scan:
    each is skipped with a warning and removed. Another model's entry (here: the same file run through
    an adapter, which changes the key) is skipped with a warning and left for that model."""
    from llamalite.formats.load import load

    lm = load(tiny)
    model = lm.model
    _saved(lm, tmp_path, IDS[:120])
    with pytest.warns(UserWarning, match="another model"):  # it sees the first entry
        other = PromptCache(tmp_path, model_key(lm, "an adapter"))
    other.save(model, IDS[:80] + [3] * 40)
    other.close()
    (path,) = [p for p in tmp_path.glob("*.llkv") if read_header(p)[0].key == model_key(lm)]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "stray.llkv").write_bytes(b"LLPC" + b"\x00" * 20)

    with pytest.warns(UserWarning) as caught:
        cache = PromptCache(tmp_path, model_key(lm))
        entry, n = cache.lookup(model, IDS[:120])
        assert n == 120
        model.setup_caches(1, 256, "f16")
        assert not cache.restore(model, entry, 119)
    said = " ".join(str(w.message) for w in caught)
    assert "stray.llkv is unreadable" in said and "checksum does not match" in said and "another model" in said
    assert not path.exists() and not (tmp_path / "stray.llkv").exists()
    assert len(list(tmp_path.glob("*.llkv"))) == 1  # the other model's
    assert cache.lookup(model, IDS[:120]) == (None, 0)
    from llamalite.generation.tokens import prefill  # a failed restore is computed instead
    torch.testing.assert_close(prefill(model, IDS[:120], cache), _prefill(model, IDS[:120], "f16")[0])
    cache.close()


KILLED_WRITER = r"""
import sys, time
import torch
from llamalite.generation import prompt_cache as pc
from llamalite.formats.load import load

lm = load(sys.argv[1])
ids = [int(x) for x in sys.argv[3].split(",")]
lm.model.setup_caches(1, 256, "f16")
with torch.inference_mode():
    lm.model(torch.tensor([ids]), torch.arange(len(ids)))
write_all = pc._write_all

def stall(f, data):  # the keys and values half written, then wait to be killed
    view = memoryview(data).cast("B")
    if len(view) < 4096:
        return write_all(f, data)
    write_all(f, view[:len(view) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(600)

pc._write_all = stall
pc.PromptCache(sys.argv[2], pc.model_key(lm)).save(lm.model, ids)
time.sleep(600)
"""


def test_a_writer_killed_mid_write_leaves_no_entry(tiny, tmp_path):
    from llamalite.formats.load import load

    lm = load(tiny)
    model = lm.model
    _saved(lm, tmp_path, IDS[:100])
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tiny), str(tmp_path),
                             ",".join(map(str, IDS[:180]))], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
        (part,) = tmp_path.glob(".*.part")
        assert part.stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(list(tmp_path.glob("*.llkv"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged to warn about
        cache = PromptCache(tmp_path, model_key(lm))
    assert not list(tmp_path.glob(".*.part"))  # the dead writer's temporary file is gone
    model.setup_caches(1, 256, "f16")
    entry, n = cache.lookup(model, IDS[:180])
    assert n == 100 and cache.restore(model, entry, 100)
    cache.close()


def test_generate_and_chat_flags(tiny, tmp_path):
    """generate saves what its cache holds at the end and the next run restores it with the same output;
    chat restores the system prompt's prefix from an earlier run; the flags' errors."""
    text = " ".join(f"word{i}" for i in range(12))  # about 80 tokens
    run = [sys.executable, "-m", "llamalite", "generate", "--model", str(tiny), "-t", "0", "-n", "8",
           "--prompt-cache", str(tmp_path / "gen"), text]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (entry,) = (tmp_path / "gen").glob("*.llkv")
    second = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert [p.name for p in (tmp_path / "gen").glob("*.llkv")] == [entry.name]  # covered: not written again

    chat = [sys.executable, "-m", "llamalite", "chat", "--model", str(tiny), "-t", "0", "-n", "8", "--system", text,
            "--prompt-cache", str(tmp_path / "chat")]
    replies = [subprocess.run(chat, capture_output=True, text=True, timeout=300, input="hello\nagain\n")
               for _ in range(2)]
    assert replies[0].returncode == 0, replies[0].stderr[-2000:]
    assert replies[1].stdout == replies[0].stdout and list((tmp_path / "chat").glob("*.llkv"))

    bad = subprocess.run(run[:-1] + ["--prompt-cache-size", "lots", text], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "cannot read 'lots' as a size" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "llamalite", "chat", "--model", str(tiny), "--prompt-cache-size", "1G"],
                         capture_output=True, text=True, timeout=300, input="hi\n")
    assert bad.returncode != 0 and "--prompt-cache-size needs --prompt-cache DIR" in bad.stderr
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("1000") == 1000


def test_a_restarted_server_answers_from_the_cache(default_model_file, tmp_path):
    """`serve --prompt-cache DIR` stopped and started again: a resent 2k-token conversation comes back
    with its whole prompt but the last token reported as cached, and the same greedy reply."""
    openai = pytest.importorskip("openai")
    from llamalite.serve import wait_until_serving

    facts = " ".join(f"Fact {i}: the box numbered {i} holds {i * 3 % 17} red marbles." for i in range(120))
    messages = [{"role": "system", "content": "You answer questions about boxes."},
                {"role": "user", "content": facts + " How many marbles does box 7 hold?"}]

    def serve_once():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "llamalite", "serve", "--model", str(default_model_file),
                                 "--port", str(port), "--max-batch", "1", "--ctx", "4096",
                                 "--prompt-cache", str(tmp_path), "--model-name", "m"], stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, proc, timeout=120)
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
            return client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
        finally:
            proc.send_signal(signal.SIGTERM)  # a clean stop writes what is queued
            proc.wait(timeout=60)

    cold = serve_once()
    assert cold.usage.prompt_tokens >= 2000 and cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = serve_once()
    assert warm.usage.prompt_tokens_details.cached_tokens == warm.usage.prompt_tokens - 1 >= 2000
    assert warm.choices[0].message.content == cold.choices[0].message.content
