"""The run store: one directory per run, on local disk or object storage (s3://, gs://
via pyarrow filesystems), one sub-directory per stage with a manifest.

Writes are atomic: local files are written under a temporary name and renamed; object
stores publish an object only when its upload completes. The manifest is written last,
so a stage without a complete manifest is never mistaken for a finished one.

Files are checksummed, uploaded and downloaded in chunks (`CHUNK` bytes), never read
whole into memory: model weights can be many gigabytes.

Object stores are reached through `pyarrow.fs.FileSystem.from_uri`, which takes its
S3 settings from the environment (measured with pyarrow 26 against an S3-compatible
server): credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
`AWS_SESSION_TOKEN`); the region from `AWS_DEFAULT_REGION` or `AWS_REGION` (the first
wins when both are set; with neither, us-east-1 under an endpoint override, else the
bucket's region asked of AWS); a non-AWS endpoint from `AWS_ENDPOINT_URL` or
`AWS_ENDPOINT_URL_S3`, whose `http://` / `https://` prefix sets the scheme (requests
are path-style). Set credentials even for a server that does not check them: without
any, uploads went out unsigned and the test server stored their chunk framing as content.
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

CHUNK = 8 << 20  # bytes per read/write when streaming a file


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able object (config sections, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def copy_stream(src, dst, chunk: int | None = None) -> dict:
    """Copy a readable stream into a writable one (`dst` may be None: only hash) in
    chunks; return {"bytes", "sha256"} of what passed through."""
    h, n, chunk = hashlib.sha256(), 0, chunk or CHUNK
    while True:
        block = src.read(chunk)
        if not block:
            break
        h.update(block)
        n += len(block)
        if dst is not None:
            dst.write(block)
        del block  # one chunk in memory at a time
    return {"bytes": n, "sha256": h.hexdigest()}


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
        if self.is_local:
            _write_local_atomically(dest, io.BytesIO(data))
        else:
            with self.fs.open_output_stream(dest) as f:  # object appears only on completion
                f.write(data)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> dict:
        """Copy a local file into the store at `rel`, streaming. Local store: temporary
        name, fsync, rename, so a reader never sees a partial file. Object store: the
        object is published when the upload completes; if the copy fails with an
        exception, the partial object pyarrow publishes on close is deleted at once
        (briefly visible; manifests, written last, and their checksums guard readers).
        Returns {"bytes", "sha256"} of the bytes written."""
        dest = self.path(rel)
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with open(local_path, "rb") as src:
            if self.is_local:
                rec = _write_local_atomically(dest, src)
            else:
                f = self.fs.open_output_stream(dest)  # the object appears only on close
                try:
                    rec = copy_stream(src, f)
                except BaseException:
                    # pyarrow cannot abort an upload: closing the stream (even from its
                    # destructor) publishes what was written, so take it down again. A
                    # killed process never closes, so it publishes nothing.
                    _close_and_delete(self.fs, f, dest)
                    raise
                f.close()
        return rec

    def download_file(self, rel: str, local_path: str | os.PathLike) -> dict:
        """Copy a store file to a local path, streaming; the local file appears only
        once complete (temporary name, fsync, rename). Returns {"bytes", "sha256"} of
        the bytes read, for the caller to compare with the manifest's record."""
        with self.fs.open_input_stream(self.path(rel)) as src:
            return _write_local_atomically(os.fspath(local_path), src)

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """{relative path: size in bytes} of every file under a directory, from one
        recursive listing ({} if the directory is missing)."""
        sel = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        return {i.path[len(self.root) + 1:]: i.size for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File}

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

    def file_record(self, rel: str) -> dict:
        """{"bytes", "sha256"} of a store file, read in chunks; parquet files also get
        "rows", taken from the footer (only the footer is read)."""
        rec = self.hash_file(rel)
        if rel.endswith(".parquet"):
            with self.fs.open_input_file(self.path(rel)) as f:
                rec["rows"] = pq.ParquetFile(f).metadata.num_rows
        return rec

    def hash_file(self, rel: str) -> dict:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return copy_stream(f, None)


def _write_local_atomically(dest: str, src) -> dict:
    """Stream `src` to a temporary name beside `dest`, fsync, rename: on POSIX a reader
    sees the old file or the whole new one. Returns {"bytes", "sha256"}."""
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            rec = copy_stream(src, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return rec


def _close_and_delete(fs: pafs.FileSystem, stream, path: str) -> None:
    try:
        stream.close()
    except Exception:
        pass
    try:
        fs.delete_file(path)
    except OSError:  # FileNotFoundError included: the upload never completed
        pass


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
