"""Stage manifests: what makes a stage's output trustworthy.

A stage's identity is a hash of everything that determines its output (its own
config, its code version, the content digests of its inputs' outputs and of the
external files it reads). Its manifest records that identity, the checksums of the
files it wrote and a digest of them (what dependent stages hash). A manifest is
`complete` only once every file is written; before a stage's files are deleted or
rewritten its manifest is first rewritten as `invalid`, so no sequence of kills can
leave a complete manifest over missing files or files made under another identity.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

MANIFEST = "manifest.json"
STATES = ("done", "stale", "missing", "broken")


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_path(stage: str) -> str:
    return f"{stage}/{MANIFEST}"


def read_manifest(store, stage: str) -> dict | None:
    if not store.exists(manifest_path(stage)):
        return None
    try:
        return store.read_json(manifest_path(stage))
    except (json.JSONDecodeError, OSError):
        return None


def is_complete(manifest: dict | None) -> bool:
    return bool(manifest) and manifest.get("status") == "complete"


def invalidate(store, stage: str, identity: str, reason: str) -> None:
    """Atomically say "not complete" before anything of the stage is deleted or rewritten."""
    store.write_json(manifest_path(stage), {"stage": stage, "status": "invalid", "identity": identity,
                                            "reason": reason, "when": time.time()})


def output_digest(records: dict, work_dir: str, logs: tuple[str, ...] = ()) -> str:
    """What dependents hash: file names relative to the stage's work dir and their
    checksums, so the same bytes give the same digest whatever directory holds them.
    Files matching `logs` are left out (see `is_log`)."""
    rels = ((in_work_dir(rel, work_dir), r["sha256"]) for rel, r in records.items())
    return fingerprint(sorted((rel, sha) for rel, sha in rels if not is_log(rel, logs)))


def in_work_dir(rel: str, work_dir: str) -> str:
    """A stage file's name relative to its work dir (unchanged if it lies elsewhere)."""
    return rel[len(work_dir) + 1:] if rel.startswith(work_dir + "/") else rel


def is_log(rel: str, logs: tuple[str, ...]) -> bool:
    """Whether `rel` (relative to the work dir) is one of a stage's logs: a name in `logs`,
    or under a folder there written with a trailing "/". A log records how the run went
    (wall-clock times, per-step metrics, a summary of the stage's other files): it differs
    between two runs that write the same results, so hashing it would make dependents of a
    forced rerun redo their work on identical data."""
    return any(rel.startswith(entry) if entry.endswith("/") else rel == entry for entry in logs)


def write_complete(store, stage: str, identity: str, version: int, params: dict, inputs: dict, external: dict,
                   work_dir: str, files: list[str], stats: dict | None, started: float,
                   logs: tuple[str, ...] = ()) -> dict:
    """Checksum the stage's files (logs too: a changed log makes the stage broken), then
    publish the manifest (last, atomically)."""
    records = {f: store.file_record(f) for f in files}
    manifest = {
        "stage": stage, "status": "complete", "identity": identity, "version": version, "params": params,
        "inputs": inputs, "external": external, "work_dir": work_dir, "files": records,
        "output_digest": output_digest(records, work_dir, logs),
        "rows": sum(r.get("rows", 0) for r in records.values()),
        "stats": stats or {}, "started": started, "finished": time.time(),
    }
    store.write_json(manifest_path(stage), manifest)
    return manifest


def missing_or_resized(store, manifest: dict) -> list[str]:
    """Files a complete manifest records that are gone or whose size changed (one
    listing per stage directory: cheap enough to check on every run)."""
    stage = manifest["stage"]
    sizes = store.file_sizes(stage)
    return [rel for rel, rec in manifest.get("files", {}).items() if sizes.get(rel) != rec["bytes"]]


def changed_files(store, manifest: dict) -> list[str]:
    """Files a manifest records that are gone or whose checksum changed (reads them all)."""
    return [rel for rel, rec in manifest.get("files", {}).items()
            if not store.exists(rel) or store.hash_file(rel)["sha256"] != rec["sha256"]]


def state_of(store, stage: str, identity: str | None) -> tuple[str, dict | None]:
    """done | stale | missing | broken, and the manifest. identity None: an input is
    not done, so whatever is stored cannot be trusted as current."""
    m = read_manifest(store, stage)
    if not is_complete(m):
        return ("stale" if m and identity is None else "missing"), m
    if identity is None or m.get("identity") != identity:
        return "stale", m
    if missing_or_resized(store, m):
        return "broken", m
    return "done", m
