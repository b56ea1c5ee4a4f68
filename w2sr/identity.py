"""What a stage's inputs are, for fingerprints: files and folders by their content, hub ids by
the revision they resolve to, built-in models by what builds them.

A config string alone is not enough: new weights at the same path, or a prompts file edited in
place, must not reuse traces and students made from the old ones. Hashes are cached by path,
size and modification time, so a 15 GB model folder is read once, not at every command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from w2sr.models import ModelSpec, builtin_digest, cache_dir

_CHUNK = 1 << 20


def _digests_file() -> Path:
    return cache_dir().parent / "digests.json"


_loaded: dict[Path, dict[str, list]] = {}  # this process's copy of each digests file


def _digests() -> dict[str, list]:
    """Read the digests file once per process; drop the entries of paths that are gone."""
    store = _digests_file()
    if store not in _loaded:
        try:
            entries = json.loads(store.read_text())
        except (OSError, ValueError):
            entries = {}
        _loaded[store] = {key: entry for key, entry in entries.items() if os.path.exists(key)}
    return _loaded[store]


def _save(cache: dict[str, list]) -> None:
    store = _digests_file()
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f"{store.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    tmp.replace(store)


def _file_digest(path: Path, cache: dict) -> tuple[str, bool]:
    """The file's sha256, and whether it had to be computed."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    if key in cache and cache[key][:2] == stamp:
        return cache[key][2], False
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    cache[key] = [*stamp, digest.hexdigest()]
    return cache[key][2], True


def content_digest(path: str | Path) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative names and contents)."""
    root = Path(path).expanduser()
    cache = _digests()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    entries, computed = [], False
    for file in files:
        digest, fresh = _file_digest(file, cache)
        entries.append((str(file.relative_to(root)) if file != root else "", digest))
        computed |= fresh
    if computed:
        _save(cache)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def model_identity(spec: str) -> str:
    """A built-in by its name and the source that builds it (`models.builtin_digest`), without
    building it; a local folder by its content; a store URI by itself; a hub id by the revision
    the local hub cache resolves it to, else by its name (with a network, the hub's latest)."""
    model = ModelSpec.parse(spec)
    if model.kind == "builtin":
        return builtin_digest(model.name)
    if model.kind == "folder" and Path(spec).expanduser().is_dir():
        return content_digest(Path(spec).expanduser())
    if model.kind != "hub":
        return spec
    try:
        from huggingface_hub import snapshot_download

        return f"{spec}@{Path(snapshot_download(spec, local_files_only=True)).name}"
    except Exception:  # not in the local hub cache
        return spec


def source_identity(path: str) -> str:
    """A local prompt file or dataset folder by its content; anything else by its name."""
    local = Path(path).expanduser()
    return content_digest(local) if "://" not in path and local.exists() else path
