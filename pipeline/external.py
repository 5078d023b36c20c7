"""Digests of what stages read from outside the run store: the base model, local data
files (their content hash), hub datasets (their resolved revision). Each is
{"location": where the stage reads it, "digest": what goes into its identity}."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from pipeline.sources import SourceSpec, _is_local, _resolve_local

# Small files of a model directory are hashed whole; weight shards by name and size
# (hashing a 15 GB checkpoint on every plan would cost minutes).
SMALL_FILE_BYTES = 1 << 20

# Stages run in driver threads: the first of them to need the base model builds it (and
# imports transformers, whose lazy module is not thread-safe), the others wait for it.
_BASE_MODEL_LOCK = threading.Lock()


def file_digest(path: str | Path) -> str:
    return _sha256(Path(path))[:16]


def base_model_external(base: str, seed: int) -> dict:
    if base == "toy":
        from pipeline.toy_model import toy_model_dir

        build = toy_model_dir(seed)  # the build's name is the hash of its recipe and seed
        return {"location": {"toy_seed": seed}, "digest": f"toy:{build.name}"}
    from pipeline import real_model

    if base in real_model.BUILTIN:  # built here from a PyPI package, cached like the toy model
        return {"location": {"builtin": base}, "digest": f"{base}:{real_model.model_dir().name}"}
    path = Path(base).expanduser()
    if path.is_dir():
        parts = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            size = f.stat().st_size
            parts.append((str(f.relative_to(path)), size, file_digest(f) if size <= SMALL_FILE_BYTES else None))
        return {"location": str(path.resolve()), "digest": hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}
    return {"location": base, "digest": f"hub:{base}@{_hub_revision(base, 'model')}"}


def data_external(source: SourceSpec | None, config_file: str) -> dict:
    """The prompts stage's data: nothing for the toy task (its generator is code)."""
    if source is None:
        return {}
    return {"data": source_external(source, Path(config_file).parent)}


def source_external(spec: SourceSpec, base_dir: Path) -> dict:
    if _is_local(spec.path):
        path = _resolve_local(spec.path, base_dir)
        return {"location": str(path.resolve()), "digest": file_digest(path)}
    return {"location": spec.path, "digest": f"hub:{spec.path}@{_hub_revision(spec.path, 'dataset')}"}


def benchmark_external(entry: dict, registry_path: str) -> dict:
    if entry["path"].startswith("toy:"):
        return {}
    return {"benchmark_data": source_external(SourceSpec.from_dict(
        {k: v for k, v in entry.items() if k != "template"}, where=registry_path), Path(registry_path).parent)}


def _hub_revision(repo_id: str, kind: str) -> str:
    """The commit a hub id resolves to now, so a dataset updated on the hub re-runs what
    read it; "unresolved" offline (HF_HUB_OFFLINE=1 or no network)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "unresolved"
    try:
        from huggingface_hub import HfApi

        info = (HfApi().dataset_info if kind == "dataset" else HfApi().model_info)(repo_id, timeout=10)
        return info.sha or "unresolved"
    except Exception:
        return "unresolved"


def base_model_source(external: dict, store, log=print):
    """What workers load the base model from. The toy model and the built-in real models
    (pipeline/real_model.py) are built here (cached) and copied into the run store, so
    workers on any node load them like a trained model; hub ids and paths are handed on
    as they are (a local path must exist on every node)."""
    location = external["location"]
    if not isinstance(location, dict):
        return location
    with _BASE_MODEL_LOCK:
        return _stored_base_model(location, store, log)


def _stored_base_model(location: dict, store, log) -> dict:
    if "builtin" in location:
        from pipeline.real_model import ensure_model

        local = ensure_model(location["builtin"], log=log)
        prefix = f"models/{location['builtin']}/{local.name}"
    else:
        from pipeline.toy_model import ensure_toy_model

        local = ensure_toy_model(location["toy_seed"], log=log)
        prefix = f"models/toy/{local.name}"
    present = store.file_sizes(prefix)
    files = {}
    for f in sorted(p for p in local.iterdir() if p.is_file()):
        rel = f"{prefix}/{f.name}"
        if present.get(rel) == f.stat().st_size:
            files[rel] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        else:
            files[rel] = store.upload_file(str(f), rel)
    return {"store_uri": store.uri, "files": files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
