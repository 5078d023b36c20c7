"""The run store: one directory per run, on local disk or object storage (s3://, gs://
via pyarrow filesystems), one sub-directory per stage with a manifest.

Writes are atomic: local files are written under a temporary name and renamed; object
stores publish an object only when its upload completes. The manifest is written last,
so a stage without a complete manifest is never mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able object (config sections, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class RunStore:
    def __init__(self, uri: str, create: bool = True):
        self.uri = uri.rstrip("/")
        if is_remote(uri):
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.uri = os.path.abspath(uri.removeprefix("file://"))
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
        if create:
            self.fs.create_dir(self.root, recursive=True)

    # -- paths -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def full_uri(self, *parts: str) -> str:
        """The URI a library outside this module (Ray Train, vLLM) can be handed."""
        return "/".join([self.uri, *[p.strip("/") for p in parts if p]])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list_files(self, *parts: str) -> list[str]:
        """Relative paths of the files under a directory (sorted); [] if missing."""
        base = self.path(*parts)
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(self.root) + 1:] for i in infos if i.type == pafs.FileType.File)

    def delete_dir(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    def delete_file(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_file(self.path(*parts))

    # -- atomic bytes ------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        dest = self.path(rel)
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)  # atomic on POSIX: readers see the old file or the new one
        else:
            with self.fs.open_output_stream(dest) as f:  # object appears only on completion
                f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    # -- typed helpers -----------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def write_rows(self, rel: str, rows: list[dict], schema: pa.Schema | None = None) -> None:
        self.write_table(rel, pa.Table.from_pylist(rows, schema=schema))

    def read_table(self, *rels: str) -> pa.Table:
        """One table from one or more parquet files (or directories of them)."""
        files = []
        for rel in rels:
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.Directory:
                files += [f for f in self.list_files(rel) if f.endswith(".parquet")]
            else:
                files.append(rel)
        tables = [pq.read_table(self.path(f), filesystem=self.fs) for f in files]
        return pa.concat_tables(tables) if tables else pa.table({})

    def read_rows(self, *rels: str) -> list[dict]:
        return self.read_table(*rels).to_pylist()

    # -- manifests ---------------------------------------------------------------------
    def manifest(self, stage: str) -> dict | None:
        if not self.exists(stage, MANIFEST):
            return None
        try:
            return self.read_json(f"{stage}/{MANIFEST}")
        except (json.JSONDecodeError, OSError):
            return None

    def file_record(self, rel: str) -> dict:
        data = self.read_bytes(rel)
        rec = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if rel.endswith(".parquet"):
            rec["rows"] = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        return rec

    def complete_stage(self, stage: str, fp: str, config: Any, inputs: dict, files: list[str],
                       stats: dict | None = None, started: float | None = None) -> dict:
        """Record a finished stage: checksums of its files, then the manifest (last)."""
        records = {f: self.file_record(f) for f in files}
        manifest = {
            "stage": stage, "status": "complete", "fingerprint": fp, "config": config,
            "inputs": inputs, "files": records,
            "rows": sum(r.get("rows", 0) for r in records.values()),
            "stats": stats or {}, "started": started, "finished": time.time(),
        }
        self.write_json(f"{stage}/{MANIFEST}", manifest)
        return manifest

    def verify_files(self, manifest: dict) -> list[str]:
        """Files of a manifest that are missing or whose checksum changed."""
        bad = []
        for rel, rec in manifest.get("files", {}).items():
            if not self.exists(rel) or hashlib.sha256(self.read_bytes(rel)).hexdigest() != rec["sha256"]:
                bad.append(rel)
        return bad
