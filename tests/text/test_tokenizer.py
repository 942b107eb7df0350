import base64
import json
from pathlib import Path

import pytest

from llamalite.text.tokenizer import (LLAMA3_PATTERN, llama3_special_tokens, tokenizer_from_gguf,
                                 tokenizer_from_hf_dir, tokenizer_from_model_file)
from tests.helpers import CORPUS, bpe_vocab_and_merges, train_bytelevel_bpe, train_sentencepiece

FIXTURES = Path(__file__).parent.parent / "fixtures"
SAMPLES = json.loads((FIXTURES / "tokenizer_samples.json").read_text())


def test_default_model_ids_equal_llama_cpp(default_lm):
    """llama.cpp's ids, recorded by tests/fixtures/record_llamacpp_ids.py."""
    recorded = json.loads((FIXTURES / "smollm2_llamacpp_ids.json").read_text())["ids"]
    assert len(recorded) == len(SAMPLES)
    for text, expected in zip(SAMPLES, recorded):
        assert default_lm.tokenizer.encode(text, add_bos=False) == expected, text


@pytest.mark.peer
def test_default_model_ids_equal_live_llama_cpp(default_lm, default_model_file):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp peer) is not installed")
    llm = llama_cpp.Llama(str(default_model_file), vocab_only=True, verbose=False)
    for text in SAMPLES + [CORPUS]:
        assert default_lm.tokenizer.encode(text, add_bos=False) == llm.tokenize(
            text.encode(), add_bos=False, special=True), text


def test_default_model_special_tokens(default_lm):
    tok = default_lm.tokenizer
    assert tok.add_bos is False  # the file says so
    assert tok.eos_token == "<|im_end|>"
    assert tok.token_id("<|im_end|>") in tok.end_ids
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == tok.token_id("<|im_start|>")
    assert tok.token_id("<|im_start|>") not in tok.encode("<|im_start|>user", parse_special=False)
    assert tok.decode(ids) == "user"  # control tokens are not shown
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user"


def _stream_pieces(tok, ids):
    dec = tok.stream()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_streaming_decode_never_breaks_utf8(default_lm):
    tok = default_lm.tokenizer
    text = "Emoji 😀👍🏽 안녕하세요 中文 ①② done"
    ids = tok.encode(text)
    pieces = _stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # some multi-byte characters did span several tokens


def test_gguf_bpe_matches_tokenizers_library(tmp_path):
    from llamalite.model.config import ModelConfig
    from llamalite.formats.gguf import gguf_metadata, open_gguf
    from tests.helpers import write_gguf

    hf = train_bytelevel_bpe()
    tokens, merges = bpe_vocab_and_merges(hf)
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=len(tokens), hidden_dim=64)
    path = write_gguf(tmp_path / "t.gguf", {}, cfg, tokens=tokens, merges=merges, pre="gpt-2")
    ours = tokenizer_from_gguf(gguf_metadata(open_gguf(path)))
    for text in SAMPLES + [CORPUS]:
        assert ours.encode(text, add_bos=False) == hf.encode(text).ids, text


def test_sentencepiece_model_file_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    path = train_sentencepiece(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ours = tokenizer_from_model_file(path)
    assert ours.add_bos and ours.bos_id == sp.bos_id()
    for text in SAMPLES + [CORPUS]:
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text))


def test_gguf_llama_vocab_matches_sentencepiece(tmp_path):
    """A GGUF `llama` tokenizer (pieces, scores, types, as llama.cpp's converter writes them)."""
    import sentencepiece as spm

    path = train_sentencepiece(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    meta = _spm_gguf_metadata(sp)
    ours = tokenizer_from_gguf(meta)
    for text in SAMPLES + [CORPUS]:
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text), text
    ids = ours.encode("héllo 😀 wörld")
    pieces = _stream_pieces(ours, ids)
    assert "".join(pieces) == "héllo 😀 wörld" and not any("\ufffd" in p for p in pieces)


def _spm_gguf_metadata(sp):
    types = []
    for i in range(sp.get_piece_size()):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(len(types))],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(len(types))],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id()}


def test_tokenizer_json_directory(tmp_path):
    hf = train_bytelevel_bpe()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "add_bos_token": True}))
    ours = tokenizer_from_hf_dir(tmp_path)
    bos = hf.token_to_id("<s>")
    for text in SAMPLES:
        assert ours.encode(text) == [bos] + hf.encode(text).ids
    assert hf.token_to_id("</s>") in ours.end_ids


def test_llama3_tiktoken_file_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is a test dependency: pip install tiktoken")
    # Ranks in tiktoken's form: the 256 bytes first, then merged tokens in the order BPE learnt them.
    hf = train_bytelevel_bpe(600)
    tokens, _ = bpe_vocab_and_merges(hf)
    from llamalite.text.tokenizer import _bytes_to_unicode

    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    as_bytes = [bytes(u2b[c] for c in t) for t in tokens if t not in ("<s>", "</s>")]
    ranks = {bytes([b]): b for b in range(256)}
    for t in as_bytes:
        ranks.setdefault(t, len(ranks))
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    special = llama3_special_tokens(len(ranks))
    enc = tiktoken.Encoding("test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    ours = tokenizer_from_model_file(path)
    assert ours.bos_id == special["<|begin_of_text|>"] and special["<|eot_id|>"] in ours.end_ids
    for text in SAMPLES + [CORPUS]:
        assert ours.encode(text, add_bos=False) == enc.encode(text, allowed_special="all"), text


def test_continuation_encoding_adds_no_leading_space(tmp_path, default_lm):
    """What a grammar engine tokenizes forced text with: SentencePiece's dummy prefix left out, special-token
    texts read as text."""
    tok = tokenizer_from_model_file(train_sentencepiece(tmp_path / "tokenizer.model"))
    assert tok.decode(tok.encode("x", add_bos=False))
    ids = tok.encode_continuation("hello world")
    assert tok.decode(tok.encode("x", add_bos=False) + ids) == "xhello world"
    assert tok.decode(tok.encode("hello world", add_bos=False)) == "hello world"  # the ordinary encoding keeps it
    smol = default_lm.tokenizer
    assert smol.encode_continuation("<|im_end|> hi") == smol.encode("<|im_end|> hi", add_bos=False, parse_special=False)


def test_special_text_is_found_exactly_where_encoding_reads_it(default_lm):
    tok = default_lm.tokenizer
    for text in ["plain", "<|im_start|>", "a<|im_end|>b", "<|im_start", "<repo_name>x", "|im_end|>", "<|endoftext|>",
                 "<tool_call>", "😀 <|im_start|>system"]:
        assert tok.has_special_text(text) == (tok.encode(text, add_bos=False) !=
                                              tok.encode(text, add_bos=False, parse_special=False)), text


def test_llama4_pre_tokenizer_matches_tokenizers_library(tmp_path):
    """Llama 4's tokenizer.json splits with the o200k regex (as GPT-4o's): a GGUF file saying
    tokenizer.ggml.pre "llama4" tokenizes as the `tokenizers` library does with that regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from llamalite.formats.gguf import gguf_metadata, open_gguf
    from llamalite.model.config import ModelConfig
    from tests.helpers import CORPUS, write_gguf

    o200k = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(o200k), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tokens, merges = bpe_vocab_and_merges(hf)
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=len(tokens), hidden_dim=64)
    ours = tokenizer_from_gguf(gguf_metadata(open_gguf(write_gguf(tmp_path / "t.gguf", {}, cfg, tokens=tokens,
                                                                  merges=merges, pre="llama4"))))
    for text in SAMPLES + [CORPUS, "He's HTTPServer's URLs: 12345 678\n\n  x/y\r\nÉCOLE élève"]:
        assert ours.encode(text, add_bos=False) == hf.encode(text).ids, text
