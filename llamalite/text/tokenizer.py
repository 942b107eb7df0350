"""Tokenizers, exactly like the reference of each format, with the `tokenizers` and `sentencepiece`
libraries as engines.

- GGUF `gpt2` (byte-level BPE): a `tokenizers` BPE built from the file's vocab and merges, with the
  pre-tokenizer regexes llama.cpp applies for the file's `tokenizer.ggml.pre` (llama-vocab.cpp).
- GGUF `llama` (SentencePiece BPE): a SentencePiece model rebuilt from the file's pieces, scores and
  types, run by the `sentencepiece` library.
- `tokenizer.json`: the `tokenizers` library as it is; `tokenizer.model`: `sentencepiece` as it is,
  or, for Llama 3's tiktoken-format file, a `tokenizers` BPE built from the ranks.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# Token types in GGUF `tokenizer.ggml.token_type` (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn when the file names none (llama.cpp auto-detects the same texts).
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|end_of_text|>", "<EOT>", "<|eot|>", "<|eom|>")  # the last two: Llama 4's

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer per `tokenizer.ggml.pre`: regexes applied one after another, each splitting
# the pieces the previous one made. Its GPT-2 regex has no trailing `|\s+`, but llama.cpp's hand-written
# matcher for that regex behaves as if it had one, so it is written out here.
# Character classes of llama.cpp's regexes, written as escapes (several of their characters have canonical
# equivalents that an editor or a normalizing copy would silently swap, emptying a range).
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_LLM_PUNCT = "[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_PRE_SETS: dict[str, tuple[tuple[str, ...], bool]] = {  # llama.cpp's pre-tokenizer types: (regexes, ignore_merges)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "llama3": ((_LLAMA3,), True),
    "dbrx": ((_LLAMA3,), False),
    "deepseek-llm": ((r"[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+", r"\s?" + _DEEPSEEK_LLM_PUNCT + "+", r"\s+$",
                      _CJK, r"\p{N}+"), False),
    "deepseek-v3": ((r"\p{N}{1,3}", _KANA,
                     r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), False),
    "deepseek-coder": ((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"), False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, r"[0-9][0-9][0-9]"), False),
    "starcoder": ((r"\p{N}", GPT2_REGEX), False),
    "gpt-2": ((GPT2_REGEX,), False),
    "qwen2": ((r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",), False),
    "bloom": ((_BLOOM,), False),
    "viking": ((_BLOOM, r"\p{N}"), False),
    "chatglm4": ((_LLAMA3,), False),
    "tekken": ((r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?"
                r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+",), True),
    # GPT-4o's and Llama 4's (o200k): letters by case runs with English contractions, digits by threes
    "gpt-4o": ((r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
                r"((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",), False),
    "chameleon": ((r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                   r"[\p{P}!-/:-@\[-`{-~]", GPT2_REGEX), False),
}
# Every `tokenizer.ggml.pre` name llama.cpp knows (llama-vocab.cpp), to its pre-tokenizer type.
_PRE_NAMES = {
    "default": "default", "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "dbrx": "dbrx", "smaug-bpe": "dbrx", "deepseek-llm": "deepseek-llm", "deepseek-v3": "deepseek-v3",
    "deepseek-coder": "deepseek-coder", "falcon": "falcon", "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2",
    "gpt-2": "gpt-2", "phi-2": "gpt-2", "jina-es": "gpt-2", "jina-de": "gpt-2", "gigachat": "gpt-2",
    "jina-v1-en": "gpt-2", "jina-v2-es": "gpt-2", "jina-v2-de": "gpt-2", "jina-v2-code": "gpt-2",
    "roberta-bpe": "gpt-2", "starcoder": "starcoder", "refact": "starcoder", "command-r": "starcoder",
    "smollm": "starcoder", "codeshell": "starcoder", "exaone": "starcoder", "minerva-7b": "starcoder",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2", "poro-chat": "bloom",
    "bloom": "bloom", "gpt3-finnish": "bloom", "chatglm-bpe": "chatglm4", "viking": "viking", "tekken": "tekken",
    "chameleon": "chameleon", "gpt-4o": "gpt-4o", "llama4": "gpt-4o", "minimax-m2": "gpt-4o",
}
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {name: _PRE_SETS[kind] for name, kind in _PRE_NAMES.items()}


class Tokenizer:
    """Text <-> token ids for one model, whatever the file format it came from.

    `encode` parses special-token texts (e.g. "<|im_start|>") into their ids unless told not to, as
    llama.cpp and transformers do for chat prompts; `decode` leaves control tokens out.
    """

    def __init__(self, engine: "_Engine", *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 end_ids: Iterable[int] = (), pad_id: int | None = None):
        self.engine = engine
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos
        self.end_ids = frozenset(i for i in (eos_id, *end_ids) if i is not None)
        self.chat_template: str | None = None  # set where the source has one (load_tokenizer), kept by save
        # The source GGUF file's own `tokenizer.ggml.*` settings (the scalars: pre-tokenizer name, special
        # ids, add_eos_token, ...), which a GGUF export writes back as they were: llama.cpp splits text by
        # the pre-tokenizer's name, and a renamed one tokenizes differently.
        self.gguf_settings: dict[str, bool | int | float | str] = {}
        self._special_pattern: re.Pattern | None = None

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def token_text(self, token_id: int) -> str:
        return self.engine.id_to_piece(token_id)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.token_text(self.bos_id)

    @property
    def eos_token(self) -> str:
        return "" if self.eos_id is None else self.token_text(self.eos_id)

    def token_id(self, text: str) -> int | None:
        return self.engine.piece_to_id(text)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        ids = self.engine.encode(text, parse_special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.engine.decode(list(ids), skip_special)

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def has_special_text(self, text: str) -> bool:
        """Whether `encode` would read part of `text` as a special token (parse_special on)."""
        if self._special_pattern is None:
            texts = sorted(self.engine.special_texts(), key=len, reverse=True)
            self._special_pattern = re.compile("|".join(map(re.escape, texts))) if texts else re.compile(r"(?!)")
        return self._special_pattern.search(text) is not None

    def encode_continuation(self, text: str) -> list[int]:
        """`text` as it tokenizes in the middle of a text: no BOS, special-token texts as plain text,
        and no leading space added (SentencePiece's dummy prefix, a Metaspace "prepend"). What a grammar
        engine needs to tokenize forced text."""
        return self.engine.encode_continuation(text)

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes as it adds them to the text (a byte-level piece mapped back to its bytes,
        SentencePiece's "▁" as a space, byte-fallback pieces as their byte); special tokens as their
        text after a 0xFF byte, which no UTF-8 text contains (llguidance's convention, so that a grammar
        can name them but text can never produce them)."""
        special = self.engine.special_ids()
        return [b"\xff" + self.engine.id_to_piece(i).encode() if i in special else raw
                for i, raw in enumerate(self.engine.raw_bytes())]


class StreamDecoder:
    """Turns token ids arriving one by one into text, never emitting a broken UTF-8 sequence.

    Decoding a window of recent ids and emitting only what follows the window's already-emitted text
    keeps context-dependent decoders right (SentencePiece drops a leading space on the first piece).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset:], self.skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete multi-byte character: wait for the rest
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (a sequence that ended mid-character)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset:], self.skip_special)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class _Engine:
    vocab_size: int

    def encode(self, text: str, parse_special: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special: bool) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def raw_bytes(self) -> list[bytes]: ...
    def special_ids(self) -> set[int]: ...
    def encode_continuation(self, text: str) -> list[int]: ...
    def special_texts(self) -> set[str]: ...


class HFEngine(_Engine):
    """A `tokenizers.Tokenizer`; its added tokens are the special texts parsed in `encode`."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._plain: Any = None  # a copy that reads special-token texts as plain text, made on first use
        self._continuation: Any = None  # the same, without SentencePiece's leading "\u2581" either
        self._plain_lock = threading.Lock()

    def encode(self, text: str, parse_special: bool) -> list[int]:
        # Two tokenizers rather than flipping `encode_special_tokens` on one: encode runs on several
        # threads at once in the server, and the flag is shared state. encode_batch gives the same ids
        # as encode but releases the GIL while it works (a megabyte of text takes ~0.4 s), so a server
        # tokenizing on a worker thread keeps answering on its event loop.
        tok = self.tok if parse_special else self._plain_tokenizer()
        return tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_continuation(self, text: str) -> list[int]:
        with self._plain_lock:
            if self._continuation is None:
                spec = json.loads(self.tok.to_str())
                spec["normalizer"] = _without_prepend(spec.get("normalizer"))
                spec["pre_tokenizer"] = _without_prepend(spec.get("pre_tokenizer"))
                continuation = type(self.tok).from_str(json.dumps(spec))
                continuation.encode_special_tokens = True
                self._continuation = continuation
        return self._continuation.encode_batch([text], add_special_tokens=False)[0].ids

    def _plain_tokenizer(self) -> Any:
        with self._plain_lock:
            if self._plain is None:
                plain = type(self.tok).from_str(self.tok.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def raw_bytes(self) -> list[bytes]:
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        pieces = [self.tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        if decoder.get("type") == "ByteLevel":  # GPT-2's printable stand-ins for bytes
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            return [bytes(byte_of[c] for c in p) if all(c in byte_of for c in p) else p.encode() for p in pieces]
        return [_sentencepiece_bytes(p) for p in pieces]  # Llama 2's tokenizer.json: "▁" and <0xNN>

    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def special_texts(self) -> set[str]:  # what encode_special_tokens reads as text: special added tokens
        return {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


class SPEngine(_Engine):
    """A `sentencepiece.SentencePieceProcessor`; control-token texts are split out before encoding."""

    def __init__(self, sp: Any, special_ids: Iterable[int]):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        # A GGUF source's token types, where SentencePiece's proto cannot hold them (it allows one UNKNOWN;
        # Phi-3's fillers are UNKNOWN too): a GGUF export writes them back.
        self.gguf_types: list[int] | None = None
        self.special = {sp.id_to_piece(i): i for i in special_ids}
        self.control_ids = {i for i in range(self.vocab_size) if sp.is_control(i)} | set(self.special.values())
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")
                       if self.special else None)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if not skip_special:
            # sentencepiece renders control tokens as "": spell them out between decoded runs.
            out, run = [], []
            for i in ids:
                if i in self.control_ids:
                    out.extend((self.sp.decode(run), self.sp.id_to_piece(i)))
                    run = []
                else:
                    run.append(i)
            return "".join(out) + self.sp.decode(run)
        return self.sp.decode([i for i in ids if i not in self.control_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def encode_continuation(self, text: str) -> list[int]:
        if getattr(self, "_continuation", None) is None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._continuation = type(self.sp)(model_proto=proto.SerializeToString())
        return self._continuation.encode(text)

    def raw_bytes(self) -> list[bytes]:
        return [b"" if i in self.control_ids or self.sp.is_unknown(i) else _sentencepiece_bytes(self.sp.id_to_piece(i))
                for i in range(self.vocab_size)]

    def special_ids(self) -> set[int]:
        return set(self.control_ids)

    def special_texts(self) -> set[str]:  # what encode splits out with parse_special
        return set(self.special)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


def _without_prepend(node: Any) -> Any:
    """A tokenizer.json normalizer or pre-tokenizer that never adds a leading "▁": Llama 2 style
    Prepend normalizers dropped, Metaspace's prepend_scheme set to never."""
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        kept = [_without_prepend(n) for n in node.get(key, []) if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        return {**node, key: kept}
    if node.get("type") == "Prepend":
        return None
    if node.get("type") == "Metaspace":
        return {**node, "prepend_scheme": "never", "add_prefix_space": False}
    return node


def _sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError(f"this tokenizer needs the {package!r} package: pip install {package}") from e


def _end_ids(find: Any, explicit: Iterable[int | None] = ()) -> list[int]:
    ids = [i for i in explicit if i is not None]
    for text in END_OF_TURN_TEXTS:
        i = find(text)
        if i is not None:
            ids.append(i)
    return ids


# ----- GGUF ---------------------------------------------------------------------------------------

def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` keys."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokens are missing)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre")
        engine = HFEngine(_bpe_from_gguf(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre))
        default_add_bos = pre in ("llama3", "llama-v3", "llama-bpe")
    elif kind == "llama":
        engine = _spm_from_gguf(tokens, types, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                                add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
        default_add_bos = True
    else:
        what = {"bert": " (WordPiece, BERT's)", "t5": " (Unigram, T5's)", "rwkv": " (RWKV's)", "ugm": " (Unigram)"}
        raise ValueError(f"GGUF tokenizer model {kind!r}{what.get(kind, '')} is not supported: llamalite runs the "
                         f"tokenizers of the LLaMA family, gpt2 (byte-level BPE) and llama (SentencePiece)")
    control = {t for t, ty in zip(tokens, types) if ty == CONTROL}

    def find(text: str) -> int | None:
        return engine.piece_to_id(text) if text in control else None

    out = Tokenizer(engine, bos_id=bos, eos_id=eos,
                    add_bos=meta.get("tokenizer.ggml.add_bos_token", default_add_bos),
                    end_ids=_end_ids(find, (meta.get("tokenizer.ggml.eot_token_id"),
                                            meta.get("tokenizer.ggml.eom_token_id"))),
                    pad_id=meta.get("tokenizer.ggml.padding_token_id"))
    out.gguf_settings = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")
                         and isinstance(v, (bool, int, float, str))}
    if kind == "gpt2":
        out.gguf_settings["tokenizer.ggml.pre"] = pre or "default"
    return out


def _bpe_from_gguf(tokens: list[str], types: list[int], merges: list[str], pre: str | None):
    tk = _require("tokenizers", "tokenizers")
    if pre is None:  # as llama.cpp: the default, and a warning that the file should be made again
        warnings.warn("this GGUF file names no pre-tokenizer (tokenizer.ggml.pre); using 'default' as llama.cpp "
                      "does, which may tokenize some text differently from the model's own tokenizer: convert "
                      "the model again with a current llama.cpp", stacklevel=3)
        pre = "default"
    if pre not in BPE_PRE_TOKENIZERS:  # llama.cpp refuses such a file ("unknown pre-tokenizer type")
        raise ValueError(f"unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); llamalite knows every name "
                         f"llama.cpp knows: {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
    regexes, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tk.Tokenizer(tk.models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    # Each digit alone is HF's own Digits pre-tokenizer (as SmolLM's and StarCoder's tokenizer.json have it):
    # the same split, in a form ExecuTorch's C++ tokenizer also reads (its Split keeps only what matches).
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True) if r == r"\p{N}" else
         tk.pre_tokenizers.Split(tk.Regex(r), behavior="isolated") for r in regexes]
        + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    # llama.cpp matches control and user-defined token texts before running BPE: control ones only when
    # parsing special tokens, user-defined ones always (an added token that is not special).
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok


def _spm_from_gguf(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool):
    spm = _require("sentencepiece", "sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(ty == BYTE for ty in types)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(add_space_prefix)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    kinds = {NORMAL: pb.ModelProto.SentencePiece.NORMAL, UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
             CONTROL: pb.ModelProto.SentencePiece.CONTROL, USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
             UNUSED: pb.ModelProto.SentencePiece.UNUSED, BYTE: pb.ModelProto.SentencePiece.BYTE}
    unknown = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    for i, (t, ty, s) in enumerate(zip(tokens, types, scores)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = t, s, kinds.get(ty, pb.ModelProto.SentencePiece.NORMAL)
        if ty == UNKNOWN and i != unknown:  # SentencePiece has one; others (Phi-3's fillers) are never produced
            piece.type = pb.ModelProto.SentencePiece.UNUSED
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    engine = SPEngine(sp, [i for i, ty in enumerate(types) if ty == CONTROL])
    engine.gguf_types = list(types)
    return engine


# ----- Hugging Face and Meta files ----------------------------------------------------------------

GGUF_SETTINGS_KEY = "llamalite_gguf"  # in tokenizer_config.json: Tokenizer.gguf_settings, kept for a GGUF export


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """The tokenizer as files `tokenizer_from_hf_dir` reads back: tokenizer.json (a `tokenizers`
    engine) or tokenizer.model (SentencePiece), with tokenizer_config.json for BOS, EOS and the chat
    template."""
    path.mkdir(parents=True, exist_ok=True)
    engine = tokenizer.engine
    if isinstance(engine, HFEngine):
        engine.tok.save(str(path / "tokenizer.json"))
    elif isinstance(engine, SPEngine):
        (path / "tokenizer.model").write_bytes(engine.sp.serialized_model_proto())
    else:
        raise ValueError(f"cannot save a {type(engine).__name__} tokenizer")
    config = {"bos_token": tokenizer.bos_token or None, "eos_token": tokenizer.eos_token or None,
              "add_bos_token": tokenizer.add_bos}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    if tokenizer.gguf_settings:
        config[GGUF_SETTINGS_KEY] = tokenizer.gguf_settings
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))


def tokenizer_from_hf_dir(path: Path) -> Tokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json` for BOS handling), or a `tokenizer.model`."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if (path / "tokenizer.json").exists():
        tk = _require("tokenizers", "tokenizers")
        tok = tk.Tokenizer.from_file(str(path / "tokenizer.json"))
        engine = HFEngine(tok)

        def named(key: str) -> int | None:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return tok.token_to_id(v) if v else None

        bos, eos = named("bos_token"), named("eos_token")
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # the post-processor decides: see whether it puts BOS in front
            add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]
        out = Tokenizer(engine, bos_id=bos, eos_id=eos, add_bos=bool(add_bos),
                        end_ids=_end_ids(lambda t: tok.token_to_id(t) if t in special else None),
                        pad_id=named("pad_token"))
        out.chat_template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        settings = cfg.get(GGUF_SETTINGS_KEY)
        out.gguf_settings = {k: v for k, v in settings.items() if k.startswith("tokenizer.ggml.")
                             and isinstance(v, (bool, int, float, str))} if isinstance(settings, dict) else {}
        return out
    if (path / "tokenizer.model").exists():
        return tokenizer_from_model_file(path / "tokenizer.model")
    raise FileNotFoundError(f"{path} has no tokenizer.json or tokenizer.model")


def tokenizer_from_model_file(file: Path) -> Tokenizer:
    """A `tokenizer.model`: SentencePiece (LLaMA 1/2) or Llama 3's tiktoken ranks (text lines)."""
    head = file.read_bytes()[:256]
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\n", head):
        return tokenizer_from_tiktoken(file)
    spm = _require("sentencepiece", "sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(file))
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    engine = SPEngine(sp, [i for i in (bos, eos) if i is not None])
    return Tokenizer(engine, bos_id=bos, eos_id=eos, add_bos=True)


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """The 256 special tokens after the base vocabulary (meta-llama/llama-models tokenizer.py, 3.1+)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return {name: n_base + i for i, name in enumerate(names)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_from_tiktoken(file: Path, pattern: str = LLAMA3_PATTERN) -> Tokenizer:
    """Llama 3's tiktoken file (one `base64(token) rank` a line) as a byte-level `tokenizers` BPE.

    tiktoken merges the adjacent pair whose merged bytes have the lowest rank; a BPE whose merges are
    ordered by the rank of their result, with whole-word lookup first (ignore_merges), does the same.
    """
    tk = _require("tokenizers", "tokenizers")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(file.read_text().splitlines()):
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[c] for c in b)

    merges = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    vocab = {text(t): r for t, r in ranks.items()}
    bpe = tk.Tokenizer(tk.models.BPE(vocab, [(m[3], m[4]) for m in merges], ignore_merges=True))
    bpe.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = tk.decoders.ByteLevel()
    special = llama3_special_tokens(len(ranks))
    bpe.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in special])
    engine = HFEngine(bpe)
    return Tokenizer(engine, bos_id=special["<|begin_of_text|>"], eos_id=special["<|end_of_text|>"],
                     add_bos=True, end_ids=[special["<|eot_id|>"], special["<|eom_id|>"]])
