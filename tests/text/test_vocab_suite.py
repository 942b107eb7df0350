"""llama.cpp's tokenizer conformance suite (tests/test-tokenizer-0 over models/ggml-vocab-*.gguf, with
add_special off and parse_special off), run against llamalite's tokenizers: every case of every
vocabulary whose tokenizer type llamalite supports gives llama.cpp's ids; the others are refused with
the reason. The vocab-only files also go through `tokenize`, `info` and `generate`."""

import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from llamalite.formats.load import ModelFileError, load, load_tokenizer

SUITE = Path(__file__).parent.parent / "fixtures" / "vocab"
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
    from llamalite.text.tokenizer import BPE_PRE_TOKENIZERS, _bpe_from_gguf

    for name in ("llama-bpe", "qwen2", "deepseek-v3", "tekken", "chameleon", "command-r", "smollm", "viking"):
        assert name in BPE_PRE_TOKENIZERS
    tokens, types = ["a", "b", "ab"], [1, 1, 1]
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'no-such'"):
        _bpe_from_gguf(tokens, types, ["a b"], "no-such")
    with pytest.warns(UserWarning, match="names no pre-tokenizer"):
        _bpe_from_gguf(tokens, types, ["a b"], None)


def _tokenizer_fields(path) -> dict:
    """A GGUF file's tokenizer.ggml.* keys (the gguf package's reader, with llamalite's faster parse)."""
    from llamalite.formats.gguf import gguf_metadata, open_gguf

    return {k: v for k, v in gguf_metadata(open_gguf(path)).items() if k.startswith("tokenizer.ggml.")}


def _export_vocab(tokenizer, path):
    """A vocab-only GGUF file of `tokenizer`, written by export's tokenizer writer."""
    import gguf

    from llamalite.formats.export import gguf_add_tokenizer

    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_add_tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", SUPPORTED + ["default-model"])
def test_export_keeps_every_tokenizer_field(vocab, default_model_file, name, tmp_path):
    """A GGUF export writes the source's tokenizer back as it was: the pre-tokenizer's name (llama.cpp
    splits text by it: the default model's `smollm` once came back as `mpt`), tokens, merges, types, scores
    and special ids; also through a Hugging Face directory saved by llamalite; and the export tokenizes the
    suite's cases as the source does."""
    from llamalite.text.tokenizer import save_tokenizer

    source = default_model_file if name == "default-model" else vocab[name]
    before = _tokenizer_fields(source)
    tokenizer = load_tokenizer(source)
    exported = _export_vocab(tokenizer, tmp_path / "export.gguf")
    after = _tokenizer_fields(exported)
    for key, value in before.items():
        if key == "tokenizer.ggml.pre" and before["tokenizer.ggml.model"] == "llama":
            continue  # SentencePiece files: llama.cpp reads no pre-tokenizer for them
        assert after.get(key) == value, key
    save_tokenizer(tokenizer, tmp_path / "hf")
    again = _tokenizer_fields(_export_vocab(load_tokenizer(tmp_path / "hf"), tmp_path / "again.gguf"))
    assert again.get("tokenizer.ggml.pre") == after.get("tokenizer.ggml.pre")
    back = load_tokenizer(exported)
    texts = [text for text, _ in cases(name)] if name != "default-model" else [text for text, _ in cases("starcoder")]
    assert [back.encode(t, add_bos=False, parse_special=False) for t in texts] == \
        [tokenizer.encode(t, add_bos=False, parse_special=False) for t in texts]


def test_a_hugging_face_tokenizer_gets_llamacpps_pre_tokenizer_name():
    """Without a name from a GGUF source, export names the pre-tokenizer from the tokenizer.json's splits
    (Split regexes, Digits, ByteLevel's own regex) as llama.cpp's converter would: SmolLM2's
    Digits-then-ByteLevel is StarCoder's split, not GPT-2's."""
    from llamalite.formats.export import _bpe_pre_name
    from llamalite.text.tokenizer import BPE_PRE_TOKENIZERS

    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}}
    assert BPE_PRE_TOKENIZERS[_bpe_pre_name(smollm)] == BPE_PRE_TOKENIZERS["smollm"]
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert BPE_PRE_TOKENIZERS[_bpe_pre_name(gpt2)] == BPE_PRE_TOKENIZERS["gpt-2"]
    llama3 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": BPE_PRE_TOKENIZERS["llama-bpe"][0][0]}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    assert _bpe_pre_name(llama3) == "llama3"


@pytest.mark.peer
@pytest.mark.parametrize("name", SUPPORTED + ["default-model"])
def test_llamacpp_tokenizes_the_export_as_the_source(vocab, default_model_file, name, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp peer is not installed (make peer)")
    source = default_model_file if name == "default-model" else vocab[name]
    exported = _export_vocab(load_tokenizer(source), tmp_path / "export.gguf")
    texts = [text for text, _ in cases(name if name != "default-model" else "starcoder")]

    def ids(path):
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    assert ids(exported) == ids(source)
