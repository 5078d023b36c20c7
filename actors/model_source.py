"""Where a worker loads a model from. A model crosses from the driver to a worker as a
*source*, never as a driver-local path: an HF hub id or a path every node has (the base
model), or {"store_uri", "files"} for a model in the run store, which the worker copies
to its own node's content-keyed cache (actors/model_cache.py)."""
from __future__ import annotations


def local_model_path(source) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, dict) and "toy_seed" in source:
        raise ValueError("the toy base model must be resolved on the driver (it is built there)")
    from actors.model_cache import materialize_model

    return materialize_model(source["store_uri"], source["files"])


def store_model_source(store_uri: str, manifest: dict, subdir: str = "model") -> dict:
    """The source of the model a train stage exported (its manifest's model/ files)."""
    files = {rel: rec for rel, rec in manifest["files"].items() if f"/{subdir}/" in rel}
    if not any(rel.endswith(f"/{subdir}/config.json") for rel in files):
        raise ValueError(f"stage {manifest['stage']} recorded no {subdir}/config.json: no model to load")
    return {"store_uri": store_uri, "files": files}
