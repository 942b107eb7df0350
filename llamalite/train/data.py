"""Training data: a corpus (text, Markdown, JSONL with a `text` field) tokenized into flat token
shards on disk, read back as memory maps.

    out/
      index.json          what is here: dtype, vocabulary, tokenizer fingerprint, shards, counts
      train-00000.bin     token ids, uint16 (vocabularies up to 65,536) or uint32, back to back
      val-00000.bin
      tokenizer.json      the tokenizer (or tokenizer.model), with tokenizer_config.json: given, or
                          trained on the corpus (--train-tokenizer)

Documents are streamed in pieces (a text file by paragraphs, a JSONL file by lines), so a corpus
larger than memory works; each document starts with BOS (or ends with EOS where the tokenizer has
no BOS), as LLaMA's pretraining data does. Every `val_every`-th piece goes to validation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..text.tokenizer import Tokenizer

INDEX_VERSION = 1
PIECE_CHARS = 1 << 16  # text is tokenized in pieces of about this many characters
SHARD_TOKENS = 1 << 27  # tokens per shard file


class DataError(ValueError):
    """A corpus or a prepared directory that cannot be used; the message says why and what to do."""


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the vocabulary: shards are only valid with the tokenizer that made them."""
    h = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.token_text(i).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file, streamed; a line that is not a
    JSON object is a DataError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n} is not a JSON object; each line must be one JSON object")
            yield n, record


def _documents(path: Path) -> Iterator[tuple[str, bool]]:
    """(text piece, starts a document) from one input file, streamed."""
    if path.suffix == ".jsonl":
        for n, record in read_jsonl(path):
            if not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{n} has no string field 'text'; JSONL input needs {{\"text\": ...}} "
                                f"on every line")
            text = record["text"]
            for i in range(0, max(len(text), 1), PIECE_CHARS):
                yield text[i:i + PIECE_CHARS], i == 0
        return
    # Text and Markdown: one document per file, read in paragraph-aligned pieces.
    first, buf = True, []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= PIECE_CHARS and not line.strip():
                yield "".join(buf), first
                first, buf, size = False, [], 0
    if buf:
        yield "".join(buf), first


def corpus_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named, and the .txt/.md/.jsonl files under directories named, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".md", ".jsonl") and q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"no such file or directory: {p}")
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, inputs))} (looked for .txt, .md and .jsonl)")
    return files


def train_tokenizer(files: Sequence[Path], vocab_size: int, out: Path) -> Tokenizer:
    """A byte-level BPE (the `tokenizers` library) trained on the corpus, saved as out/tokenizer.json
    with <s> and </s> as BOS and EOS."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    from ..text.tokenizer import tokenizer_from_hf_dir

    if vocab_size < 300:
        raise DataError(f"a byte-level BPE needs a vocabulary of at least 300 (256 bytes + specials), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text for f in files for text, _ in _documents(f)), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": False}))
    return tokenizer_from_hf_dir(out)


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self.file is None or self.shards[-1]["tokens"] >= SHARD_TOKENS:
                self._open()
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            self.file.write(part.tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    def _open(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    @property
    def count(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def prepare(inputs: Sequence[str | Path], tokenizer: Tokenizer | None, out: str | Path, *,
            val_every: int = 100, train_tokenizer_vocab: int | None = None, progress: bool = True) -> dict:
    """Tokenize the corpus into out/ (see the module docstring); returns the index."""
    from tqdm import tqdm

    out = Path(out).expanduser()
    files = corpus_files(inputs)
    out.mkdir(parents=True, exist_ok=True)
    source = "trained on the corpus"
    if train_tokenizer_vocab:
        tokenizer = train_tokenizer(files, train_tokenizer_vocab, out)
    elif tokenizer is None:
        raise DataError("give a tokenizer (--tokenizer MODEL) or train one on the corpus (--train-tokenizer VOCAB)")
    else:
        from ..text.tokenizer import save_tokenizer

        source = "given"
        save_tokenizer(tokenizer, out)  # training and export find it here
    if val_every < 2:
        raise DataError("val_every must be at least 2 (every val_every-th piece of text goes to validation)")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: _ShardWriter(out, split, dtype) for split in ("train", "val")}
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    total = sum(f.stat().st_size for f in files)
    pieces = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for f in files:
            for text, starts in _documents(f):
                ids = tokenizer.encode(text, add_bos=False, parse_special=False)
                if starts and bos is not None:
                    ids = [bos] + ids
                pieces += 1
                writers["val" if pieces % val_every == 0 else "train"].write(ids)
                bar.update(len(text.encode("utf-8", "surrogatepass")))
            if bos is None and eos is not None:  # no BOS: documents are separated by EOS instead
                writers["train"].write([eos])
    for w in writers.values():
        w.close()
    counts = {split: w.count for split, w in writers.items()}
    if counts["train"] == 0:
        raise DataError(f"the corpus ({', '.join(map(str, files))}) holds no text to train on")
    if counts["val"] == 0:  # a small corpus: hold out its tail so validation has something
        _split_tail(out, writers, dtype)
        counts = {split: w.count for split, w in writers.items()}
    index = {"version": INDEX_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
             "bos_id": bos, "eos_id": eos, "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                                                         "source": source},
             "files": [str(f) for f in files], "val_every": val_every,
             "train": {"tokens": counts["train"], "shards": writers["train"].shards},
             "val": {"tokens": counts["val"], "shards": writers["val"].shards}}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def _split_tail(out: Path, writers: dict[str, _ShardWriter], dtype: np.dtype) -> None:
    """Move the last ~10% of the training tokens into a validation shard."""
    train = writers["train"].shards[-1]
    data = np.fromfile(out / train["file"], dtype=dtype)
    cut = max(1, len(data) // 10)
    data[:-cut].tofile(out / train["file"])
    train["tokens"] = len(data) - cut
    val = writers["val"]
    for s in val.shards:
        (out / s["file"]).unlink(missing_ok=True)
    val.shards = [{"file": "val-00000.bin", "tokens": cut}]
    data[-cut:].tofile(out / "val-00000.bin")


@dataclass
class TokenData:
    """A prepared directory read back: one split's shards as memory maps, sampled in windows."""
    index: dict
    shards: list[np.ndarray]

    @classmethod
    def open(cls, path: str | Path, split: str) -> "TokenData":
        path = Path(path).expanduser()
        index_file = path / "index.json"
        if not index_file.exists():
            raise DataError(f"{path} is not a prepared data directory (no index.json); make one with "
                            f"`llamalite prepare --tokenizer MODEL INPUT... --out {path}`")
        index = json.loads(index_file.read_text())
        if index.get("version") != INDEX_VERSION:
            raise DataError(f"{index_file} is version {index.get('version')}; this llamalite reads "
                            f"version {INDEX_VERSION}: prepare the data again")
        shards = []
        for s in index[split]["shards"]:
            f = path / s["file"]
            if not f.exists() or f.stat().st_size != s["tokens"] * np.dtype(index["dtype"]).itemsize:
                raise DataError(f"{f} is missing or not the size index.json records: prepare the data again")
            if s["tokens"]:
                shards.append(np.memmap(f, dtype=index["dtype"], mode="r"))
        return cls(index, shards)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def valid_starts(self, length: int) -> int:
        """How many windows of `length` tokens lie inside one shard."""
        return sum(max(0, len(s) - length + 1) for s in self.shards)

    def window(self, k: int, length: int) -> np.ndarray:
        """The k-th window of `length` tokens (0 <= k < valid_starts(length)), as int64."""
        for s in self.shards:
            n = max(0, len(s) - length + 1)
            if k < n:
                return np.asarray(s[k:k + length], dtype=np.int64)
            k -= n
        raise IndexError(k)
