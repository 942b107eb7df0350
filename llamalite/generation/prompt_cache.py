"""A prompt cache on disk: the keys and values of processed prompts, kept across restarts, so that a
restarted server or chat answers a resent conversation without computing its prefix again.

One file per entry in a directory: a header (the model and KV layout it belongs to, its token ids), then
each layer's keys and values for those tokens in the KV cache's own type and layout, then a CRC-32 of it
all. An entry serves every prompt that shares a prefix with it: a position attends only to earlier ones,
so an entry's first n positions are what a prefill of its first n tokens computes.

Files are written under a temporary name and renamed into place, so a process killed mid-write leaves no
entry, only a temporary file that the next start removes; the checksum catches any other damage. The
directory is bounded in bytes: the least recently used entries (a restore touches the file's mtime, so the
order survives restarts) go first. Entries of other models may share the directory: they are skipped, count
towards the bound, and are evicted like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import struct
import threading
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from ..formats.loaded import LoadedModel
    from ..model.transformer import Transformer

MAGIC, VERSION = b"LLPC", 1
SUFFIX, PART = ".llkv", ".part"
DEFAULT_SIZE = 4 << 30  # bytes: a 2k-token conversation of a 7B model is about 1 GiB of f16 keys and values
MIN_TOKENS = 64  # shorter prompts cost little to recompute: not worth a file
_PREAMBLE = struct.Struct("<4sII")  # magic, version, length of the JSON header


def parse_size(text: str) -> int:
    """Bytes from "4G", "512M", "100k" or a plain number (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: give bytes, or a number with K, M, G or T (e.g. 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def fingerprint(path: Path) -> str:
    """A model file's (or checkpoint directory's) identity from its content, cheap for large files: the
    size, the first MiB (a GGUF file's metadata and tensor table), 16 samples across it and its end. A
    copied or renamed file keeps its identity; a fine-tune of the same shape does not."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in (".gguf", ".safetensors", ".pth", ".pt", ".bin", ".json"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if f != path else ''}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for i in range(17):
                fh.seek(max(0, min(size - 65536, size * i // 16)))
                h.update(fh.read(65536))
    return h.hexdigest()


def model_key(lm: "LoadedModel", *extra: str) -> str:
    """What an entry's keys and values depend on besides its tokens: the weights, the arithmetic that ran
    them (dtype, device, quantized kernels or dense), and `extra` (e.g. an adapter's fingerprint)."""
    model = lm.model
    parts = [fingerprint(lm.path), lm.format, str(model.norm.weight.dtype), model.device.type,
             type(model.layers[0].attention.wq).__name__, *extra]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass
class Entry:
    path: Path
    key: str
    kind: str  # the KV type (model.KV_TYPES)
    layers: int
    heads: int
    row_bytes: int  # bytes of one position of one head
    tokens: np.ndarray  # int32 (n,)

    @property
    def layout(self) -> tuple[str, int, int, int]:
        return self.kind, self.layers, self.heads, self.row_bytes

    @property
    def payload_bytes(self) -> int:
        return self.layers * 2 * self.heads * len(self.tokens) * self.row_bytes


class CorruptEntry(ValueError):
    """A file in the cache directory that is not a whole, intact entry."""


def read_header(path: Path) -> tuple[Entry, int]:
    """An entry's header, and the offset where its keys and values start."""
    with open(path, "rb") as f:
        pre = f.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size:
            raise CorruptEntry("it is shorter than an entry's header")
        magic, version, hlen = _PREAMBLE.unpack(pre)
        if magic != MAGIC or version != VERSION:
            raise CorruptEntry("it is not a llamalite prompt-cache entry of this version")
        try:
            h = json.loads(f.read(hlen))
            n = int(h["tokens"])
            tokens = np.frombuffer(f.read(4 * n), dtype=np.int32)
            entry = Entry(path, h["model"], h["kv"], int(h["layers"]), int(h["heads"]), int(h["row_bytes"]), tokens)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"its header cannot be read ({e})") from None
    start = _PREAMBLE.size + hlen + 4 * n
    if len(tokens) != n or path.stat().st_size != start + entry.payload_bytes + 4:
        raise CorruptEntry("it is cut short or has bytes too many")
    return entry, start


def _caches(model: "Transformer") -> list:
    return [layer.attention.cache for layer in model.layers]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _layout(model: "Transformer") -> tuple[str, int, int, int]:
    """(KV type, layers, heads, bytes per position and head) of the model's KV caches."""
    caches = _caches(model)
    k = _as_bytes(caches[0].k)  # (B, heads, S, row_bytes)
    return caches[0].kind, len(caches), k.shape[1], k.shape[3]


class PromptCache:
    """The prompt cache in `directory` for one model (`key`: model_key), at most `max_bytes` on disk.
    lookup and restore before a prefill; save after it (the file is written on a background thread)."""

    def __init__(self, directory: str | Path, key: str, max_bytes: int = DEFAULT_SIZE, min_tokens: int = MIN_TOKENS):
        self.dir = Path(directory).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot use {self.dir} as a prompt cache: {e.strerror}") from None
        if max_bytes <= 0:
            raise ValueError("the prompt cache's size must be positive")
        self.key, self.max_bytes, self.min_tokens = key, max_bytes, min_tokens
        self.entries: dict[str, Entry] = {}  # file name -> this model's entries
        self.skipped: set[str] = set()  # names of other models' entries, warned about once
        self._seen_mtime = -1
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._closed = False
        self._warned_big = False
        self._remove_stale_parts()
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="llamalite-prompt-cache", daemon=True)
        self._writer.start()

    # ----- finding an entry -----

    def _scan(self) -> None:
        """Bring the index up to date with the directory (other processes write to it too)."""
        try:
            mtime = self.dir.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._seen_mtime:
            return
        self._seen_mtime = mtime
        names = {p.name for p in self.dir.glob("*" + SUFFIX)}
        with self._lock:
            for name in list(self.entries):
                if name not in names:
                    del self.entries[name]
            for name in names - set(self.entries) - self.skipped:
                try:
                    entry, _ = read_header(self.dir / name)
                except FileNotFoundError:
                    continue
                except (CorruptEntry, OSError) as e:
                    self._discard(self.dir / name, str(e))
                    continue
                if entry.key != self.key:
                    self.skipped.add(name)
                    warnings.warn(f"prompt cache: {self.dir / name} was saved by another model (or another way of "
                                  f"running it): skipped", stacklevel=2)
                    continue
                self.entries[name] = entry

    def lookup(self, model: "Transformer", tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry for the model's KV caches (their type and layout: entries of another --kv-type are
        left for runs with that one) sharing the longest prefix with `tokens`, and that prefix's length."""
        self._scan()
        layout = _layout(model)
        want = np.asarray(tokens, dtype=np.int32)
        best, best_n = None, 0
        with self._lock:
            for entry in self.entries.values():
                if entry.layout != layout:
                    continue
                m = min(len(want), len(entry.tokens))
                differ = np.flatnonzero(entry.tokens[:m] != want[:m])
                n = int(differ[0]) if len(differ) else m
                if n > best_n:
                    best, best_n = entry, n
        return best, best_n

    def restore(self, model: "Transformer", entry: Entry, n: int, row: int = 0) -> bool:
        """Load the entry's first n positions into cache row `row`. False (with a warning) when the file
        is gone or damaged: the caller then computes those positions."""
        if _layout(model) != entry.layout:
            raise ValueError(f"{entry.path.name} holds keys and values of another layout than this model's caches")
        try:
            _, start = read_header(entry.path)
            with open(entry.path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
            if zlib.crc32(memoryview(data)[:-4]) != struct.unpack("<I", data[-4:])[0]:
                raise CorruptEntry("its checksum does not match")
        except FileNotFoundError:  # evicted by another process meanwhile
            with self._lock:
                self.entries.pop(entry.path.name, None)
            return False
        except (CorruptEntry, OSError) as e:
            with self._lock:
                self._discard(entry.path, str(e))
            return False
        payload = torch.frombuffer(memoryview(data)[start:-4], dtype=torch.uint8)
        per = entry.heads * len(entry.tokens) * entry.row_bytes
        with torch.inference_mode():
            for i, cache in enumerate(_caches(model)):
                for j, dst in enumerate((cache.k, cache.v)):
                    src = payload[(2 * i + j) * per:(2 * i + j + 1) * per].view(entry.heads, len(entry.tokens), -1)
                    _as_bytes(dst)[row, :, :n].copy_(src[:, :n])
        os.utime(entry.path)  # recently used: last to be evicted
        return True

    # ----- saving -----

    def save(self, model: "Transformer", tokens: Sequence[int], row: int = 0) -> bool:
        """Queue the keys and values of cache row `row`, which holds `tokens` at positions 0.., for writing.
        Nothing is written for a short prompt, one an entry already covers (that entry is touched instead),
        or while earlier writes are still behind. True if queued."""
        n = len(tokens)
        if n < self.min_tokens or self._closed:
            return False
        kind, layers, heads, row_bytes = _layout(model)
        size = layers * 2 * heads * n * row_bytes
        if size > self.max_bytes:
            if not self._warned_big:
                self._warned_big = True
                warnings.warn(f"prompt cache: a {n}-token prompt takes {size / 2**20:.0f} MiB, more than the cache's "
                              f"{self.max_bytes / 2**20:.0f} MiB (--prompt-cache-size): not saved", stacklevel=2)
            return False
        covered, _ = self.lookup(model, tokens)
        if covered is not None and len(covered.tokens) >= n and np.array_equal(covered.tokens[:n], tokens):
            try:
                os.utime(covered.path)
            except OSError:
                pass
            return False
        if self._pending >= 2:  # the disk is slower than the requests: skip rather than hold their memory
            return False
        buf = torch.empty(size, dtype=torch.uint8)
        per = heads * n * row_bytes
        with torch.inference_mode():
            for i, cache in enumerate(_caches(model)):
                for j, src in enumerate((cache.k, cache.v)):
                    buf[(2 * i + j) * per:(2 * i + j + 1) * per].view(heads, n, -1).copy_(_as_bytes(src)[row, :, :n])
        header = json.dumps({"model": self.key, "kv": kind, "layers": layers, "heads": heads, "row_bytes": row_bytes,
                             "tokens": n}).encode()
        with self._lock:
            self._pending += 1
        self._queue.put((np.asarray(tokens, dtype=np.int32), kind, header, buf))
        return True

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                try:
                    self._write(*job)
                except OSError as e:
                    warnings.warn(f"prompt cache: could not write to {self.dir}: {e}", stacklevel=1)
            finally:
                with self._lock:
                    self._pending -= job is not None
                self._queue.task_done()

    def _write(self, tokens: np.ndarray, kind: str, header: bytes, buf: torch.Tensor) -> None:
        name = hashlib.sha256(f"{self.key}:{kind}:".encode() + tokens.tobytes()).hexdigest()[:32] + SUFFIX
        tmp = self.dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PART}"
        parts = (_PREAMBLE.pack(MAGIC, VERSION, len(header)), header, tokens.tobytes(), buf.numpy())
        crc = 0
        try:
            with open(tmp, "wb") as f:
                for part in parts:
                    crc = zlib.crc32(part, crc)
                    _write_all(f, part)
                f.write(struct.pack("<I", crc))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)  # the entry appears whole or not at all
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry, _ = read_header(self.dir / name)
        with self._lock:
            self.entries[name] = entry
            # Entries this one extends (a conversation's earlier turns) are now redundant.
            for other in [e for k, e in self.entries.items() if k != name and e.kind == kind
                          and len(e.tokens) < len(tokens) and np.array_equal(e.tokens, tokens[:len(e.tokens)])]:
                other.path.unlink(missing_ok=True)
                del self.entries[other.path.name]
        self._evict()

    def _evict(self) -> None:
        """Remove the least recently used entries, of any model, until the directory fits max_bytes."""
        files = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            with self._lock:
                self.entries.pop(p.name, None)

    def _discard(self, path: Path, why: str) -> None:
        # Called with the lock held. A damaged entry is worth nothing to anyone: it goes.
        warnings.warn(f"prompt cache: {path} is unreadable ({why}): skipped and removed", stacklevel=3)
        self.entries.pop(path.name, None)
        path.unlink(missing_ok=True)

    def _remove_stale_parts(self) -> None:
        """Temporary files of writers that died (killed mid-write): their pid no longer runs."""
        for p in self.dir.glob(".*" + PART):
            try:
                pid = int(p.name.split(".")[-3])
                alive = pid == os.getpid() or _alive(pid)
                if not alive or time.time() - p.stat().st_mtime > 3600:
                    p.unlink(missing_ok=True)
            except (ValueError, IndexError, OSError):
                continue

    # ----- lifetime -----

    def flush(self) -> None:
        """Wait until every queued entry is on disk."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()


def _write_all(f, data) -> None:
    # One write per MiB: the parts are large and a partly written file must look partly written.
    view = memoryview(data).cast("B")
    for lo in range(0, len(view), 1 << 20):
        f.write(view[lo:lo + (1 << 20)])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
