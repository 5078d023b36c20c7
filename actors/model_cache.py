"""A node-local cache of models copied from the run store, keyed by content.

Models travel between stages as run-store URIs plus the manifest records of their files
({"bytes", "sha256"}). Whoever loads a model (a sampling actor, a train worker, a scorer)
calls `materialize_model`, which returns a local directory holding the model's files
under their base names, ready for transformers / vLLM.

Key. An entry is named by a hash of the sorted (file name, sha256) pairs. A model
retrained and written to the same store path has other checksums, hence another entry:
an old copy is never served for new content, and the same content is copied only once.

Atomic fill. Files are downloaded into a temporary directory inside the cache root (same
filesystem), each file's size and sha256 checked while it streams (a mismatch raises
`ModelFileMismatch` naming the file, and the temporary directory is removed), then the
directory is renamed to the entry's final name. Only final names are ever used, so a
copy cut short (an error, a killed process) is never mistaken for a model. Temporary
directories untouched for more than an hour are removed by the next call.

Concurrency. Processes on one node (e.g. several Ray actors) may fill the same entry at
once: each downloads into its own temporary directory, the first rename wins, the others
discard their copy and use the winner's.

Location. `$VERIFINE_MODEL_CACHE` if set, else `$VERIFINE_CACHE/models` (VERIFINE_CACHE
defaults to ~/.cache/verifine).

Size bound. `$VERIFINE_MODEL_CACHE_MAX_GB` (default 50; GB = 10**9 bytes). Every use of an
entry sets its directory's mtime to now; after adding an entry, least-recently-used
entries are evicted until the total is at most the bound. The entry being returned is
never evicted, so a single model larger than the bound is kept (alone). Eviction first
renames an entry to a hidden name (atomically: no process finds a half-deleted entry
under its final name), then deletes it. A process already reading files of an evicted
entry is not disturbed: on POSIX an open file stays readable after it is unlinked, until
it is closed. A process holding only the directory path, not yet opened files, gets
FileNotFoundError when it opens them; calling `materialize_model` again copies the model
anew. Since eviction goes least recently used first, this needs the cache to fill past
the bound with other models between the two steps.

Local stores. When the store is a local directory (no "://", or file://), the model's
directory in the store is returned directly, without a copy, after checking that the
files exist with their recorded sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from actors.store import RunStore, is_remote

TMP_PREFIX = ".tmp-"      # a fill in progress (or abandoned)
DEL_PREFIX = ".del-"      # an evicted entry being deleted
STALE_TMP_S = 3600        # temporary directories untouched this long are abandoned
DEFAULT_MAX_GB = 50.0


class ModelFileMismatch(RuntimeError):
    """A model file in the store is missing or differs from its manifest record."""


def default_cache_root() -> Path:
    if os.environ.get("VERIFINE_MODEL_CACHE"):
        return Path(os.environ["VERIFINE_MODEL_CACHE"])
    base = Path(os.environ.get("VERIFINE_CACHE", Path.home() / ".cache" / "verifine"))
    return base / "models"


def max_cache_bytes() -> int:
    return int(float(os.environ.get("VERIFINE_MODEL_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 1e9)


def cache_key(files: dict[str, dict]) -> str:
    """Hash of the sorted (file name, sha256) pairs: equal content, equal key."""
    pairs = sorted((posixpath.basename(rel), rec["sha256"]) for rel, rec in files.items())
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:32]


def materialize_model(store_uri: str, files: dict[str, dict], cache_root: str | None = None) -> str:
    """A local directory on this node holding `files` (store-relative paths -> manifest
    records {"bytes", "sha256"}) under their base names; see the module docstring."""
    _check_files(files)
    store = RunStore(store_uri, create=False)
    if not is_remote(store_uri):
        return _local_model_dir(store, files)

    root = Path(cache_root) if cache_root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    final = root / cache_key(files)
    if _touch(final):  # a hit: only complete entries carry a final name
        return str(final)

    _check_sizes(store, files)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        for rel, rec in sorted(files.items()):
            name = posixpath.basename(rel)
            got = store.download_file(rel, tmp / name)
            if got["bytes"] != rec["bytes"] or got["sha256"] != rec["sha256"]:
                raise ModelFileMismatch(
                    f"{store.full_uri(rel)}: expected {rec['bytes']} bytes sha256 {rec['sha256']}, "
                    f"got {got['bytes']} bytes sha256 {got['sha256']}")
        try:
            os.rename(tmp, final)  # atomic: the entry appears complete or not at all
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process filled it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _touch(final)
    _evict(root, keep=final.name, limit=max_cache_bytes())
    return str(final)


# -- helpers ----------------------------------------------------------------------------
def _check_files(files: dict[str, dict]) -> None:
    if not files:
        raise ValueError("materialize_model: no files given")
    names = [posixpath.basename(rel) for rel in files]
    if len(set(names)) != len(names):
        raise ValueError(f"materialize_model: files share a base name: {sorted(files)}")


def _check_sizes(store: RunStore, files: dict[str, dict]) -> None:
    """Every file exists in the store with its recorded size (one listing per directory)."""
    sizes: dict[str, int] = {}
    for d in sorted({posixpath.dirname(rel) for rel in files}):
        sizes.update(store.file_sizes(d))
    for rel, rec in sorted(files.items()):
        if rel not in sizes:
            raise ModelFileMismatch(f"{store.full_uri(rel)}: missing from the store")
        if sizes[rel] != rec["bytes"]:
            raise ModelFileMismatch(
                f"{store.full_uri(rel)}: {sizes[rel]} bytes in the store, manifest says {rec['bytes']}")


def _local_model_dir(store: RunStore, files: dict[str, dict]) -> str:
    dirs = {posixpath.dirname(rel) for rel in files}
    if len(dirs) != 1:
        raise ValueError(f"materialize_model: files of one model must share a directory: {sorted(dirs)}")
    _check_sizes(store, files)
    return store.path(dirs.pop())


def _touch(path: Path) -> bool:
    """Mark an entry as used now; False if it does not exist."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _entry_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total


def _last_activity(path: Path) -> float:
    """Latest mtime of a directory and the files in it (a file being written updates its own)."""
    latest = path.stat().st_mtime
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                latest = max(latest, os.lstat(os.path.join(dirpath, n)).st_mtime)
            except FileNotFoundError:
                pass
    return latest


def _clean_leftovers(root: Path) -> None:
    """Remove abandoned fills (untouched for an hour) and half-deleted evicted entries."""
    now = time.time()
    for p in root.iterdir():
        try:
            if p.name.startswith(DEL_PREFIX) or (
                    p.name.startswith(TMP_PREFIX) and now - _last_activity(p) > STALE_TMP_S):
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _evict(root: Path, keep: str, limit: int) -> list[str]:
    """Delete least-recently-used entries (never `keep`) until the total is <= limit."""
    entries = []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            entries.append((p.stat().st_mtime, p.name, _entry_bytes(p)))
        except FileNotFoundError:
            pass
    total = sum(size for _, _, size in entries)
    evicted = []
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        if name == keep:
            continue
        doomed = root / f"{DEL_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root / name, doomed)
        except FileNotFoundError:  # evicted by another process meanwhile
            total -= size
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        total -= size
        evicted.append(name)
    return evicted
