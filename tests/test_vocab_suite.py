"""llama.cpp's tokenizer conformance suite (tests/test-tokenizer-0 over models/ggml-vocab-*.gguf, with
add_special off and parse_special off), run against llamalite's tokenizers: every case of every
vocabulary whose tokenizer type llamalite supports gives llama.cpp's ids; the others are refused with
the reason. The vocab-only files also go through `tokenize`, `info` and `generate`."""

import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from llamalite.loading import ModelFileError, load, load_tokenizer

SUITE = Path(__file__).parent / "fixtures" / "vocab"
SEP = "\n__ggml_vocab_test__\n"
SUPPORTED = ["deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-spm", "mpt", "phi-3", "refact", "starcoder"]
UNSUPPORTED = {"bert-bge": "WordPiece, BERT's"}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """name -> the vocab-only GGUF file, unpacked."""
    out = tmp_path_factory.mktemp("vocab")
    files = {}
    for packed in sorted(SUITE.glob("*.gguf.xz")):
        name = packed.name[len("ggml-vocab-"):-len(".gguf.xz")]
        files[name] = out / packed.name[:-3]
        files[name].write_bytes(lzma.decompress(packed.read_bytes()))
    return files


def cases(name: str) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0's reading of the .inp / .out pair: inputs split on the separator, one line of ids each."""
    inputs = (SUITE / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEP)
    outputs = (SUITE / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(outputs) >= len(inputs)
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs)]


def test_the_suite_is_all_here(vocab):
    assert sorted(vocab) == sorted(SUPPORTED + list(UNSUPPORTED))


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_case_gives_llamacpps_ids(vocab, name):
    tokenizer = load_tokenizer(vocab[name])
    wrong = [(text, want, got) for text, want in cases(name)
             if (got := tokenizer.encode(text, add_bos=False, parse_special=False)) != want]
    assert not wrong, f"{len(wrong)} of {len(cases(name))} differ, first: {wrong[0]}"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_other_tokenizer_types_are_refused_with_the_reason(vocab, name):
    with pytest.raises(ValueError, match=f"not supported.*{UNSUPPORTED[name]}|{UNSUPPORTED[name]}.*not supported"):
        load_tokenizer(vocab[name])


def test_the_verbs_on_a_vocab_only_file(vocab):
    path = str(vocab["deepseek-coder"])
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamalite", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    tokens = run("tokenize", "--model", path, "--no-special", " (")
    assert tokens.returncode == 0 and tokens.stdout.strip() == "[32013, 334]"  # BOS, then a user-defined token
    info = run("info", "--model", path)
    assert info.returncode == 0 and "vocabulary only" in info.stdout and "pre_tokenizer: deepseek-coder" in info.stdout
    gen = run("generate", "--model", path, "hi")
    assert gen.returncode != 0 and "holds a tokenizer's vocabulary and no weights" in gen.stderr
    with pytest.raises(ModelFileError, match="vocab-only GGUF file"):
        load(vocab["llama-spm"])


def test_pre_tokenizer_names(tmp_path):
    """Every name llama.cpp knows maps to a set of regexes; a name it does not know is refused, as llama.cpp
    refuses it; a file that names none gets the default with a warning."""
    from llamalite.tokenizer import BPE_PRE_TOKENIZERS, _bpe_from_gguf

    for name in ("llama-bpe", "qwen2", "deepseek-v3", "tekken", "chameleon", "command-r", "smollm", "viking"):
        assert name in BPE_PRE_TOKENIZERS
    tokens, types = ["a", "b", "ab"], [1, 1, 1]
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'no-such'"):
        _bpe_from_gguf(tokens, types, ["a b"], "no-such")
    with pytest.warns(UserWarning, match="names no pre-tokenizer"):
        _bpe_from_gguf(tokens, types, ["a b"], None)
