"""Data sources: math prompts and benchmarks from local files or the HF hub.

A source is described by a :class:`SourceSpec`: where the rows live (a local
``.jsonl`` / ``.json`` / ``.parquet`` file, or an HF hub dataset id), which
column holds the problem, and how to get the gold answer (a column, the last
``\\boxed{}`` of a solution column, or the GSM8K ``#### answer`` convention).

:func:`load_problems` turns a spec into rows ``{prompt_id, problem, gold, source}``
(the ``prompts`` artifact of DESIGN.md) plus load statistics. Every failure is a
:class:`SourceError` whose message names the file or dataset id (and the row /
line, or the columns present, where that is the problem).

Path rule for local files (kept deliberately simple):
  * absolute paths (``~`` expanded) are used as they are;
  * a relative path is tried first against ``base_dir`` (the directory of the
    config file that named it) and then against the current working directory;
    the first that exists wins. If neither exists the error lists both.
A path is treated as local when it ends in ``.jsonl``/``.json``/``.parquet``,
starts with ``/``, ``./``, ``../`` or ``~``, or is an existing file; anything else is
an HF hub dataset id (``owner/name``).

The benchmark registry (``configs/benchmarks.yaml``) maps a benchmark name to
``{source: {SourceSpec fields}, template: <prompt template name>}``; see
:func:`load_benchmark_registry`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError,
                      model_validator)

__all__ = [
    "ANSWER_FROM",
    "DEFAULT_TEMPLATE",
    "FieldProblem",
    "Problem",
    "SourceError",
    "SourceSpec",
    "default_registry_path",
    "find_boxed",
    "load_benchmark_registry",
    "load_problems",
    "prompt_id_for",
    "validation_problems",
]

AnswerFrom = Literal["field", "boxed_solution", "gsm8k"]
ANSWER_FROM = typing.get_args(AnswerFrom)
DEFAULT_TEMPLATE = "qwen-boxed"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class SourceError(ValueError):
    """A data source could not be read or does not have the expected shape."""


# --------------------------------------------------------------------------- spec

class FieldProblem(ValueError):
    """Raised inside a model validator to blame a key below the model being validated
    (e.g. ``answer_field`` of a SourceSpec, ``train.data.dpo`` of a Config), so the error
    message names that key rather than the whole model."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _show(v: Any) -> str:
    return f"{type(v).__name__} {_brief(v)}"


def _non_empty_str(v: Any) -> Any:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty string, got {_show(v)}")
    return v


NonEmptyStr = Annotated[str, BeforeValidator(_non_empty_str)]


class SourceSpec(BaseModel):
    """Where a set of problems lives and how its columns map to problem/gold.

    name           label of the source; goes into every row's ``source`` and
                   into the prompt_id hash (so keep it stable).
    path           local .jsonl/.json/.parquet file, or an HF hub dataset id.
    split, subset  HF ``split`` and config name (ignored for local files).
    problem_field  column holding the problem text.
    answer_field   column holding the gold (answer_from "field"), or the text
                   ending in ``#### <answer>`` (answer_from "gsm8k").
    answer_from    "field" | "boxed_solution" (last \\boxed{} of
                   ``solution_field``) | "gsm8k".
    solution_field column read by answer_from "boxed_solution".
    limit          keep only the first N usable rows (file order).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NonEmptyStr
    path: NonEmptyStr
    split: NonEmptyStr = "test"
    subset: Optional[NonEmptyStr] = None
    problem_field: NonEmptyStr = "problem"
    answer_field: Optional[NonEmptyStr] = "answer"
    answer_from: AnswerFrom = "field"
    solution_field: NonEmptyStr = "solution"
    limit: Optional[StrictInt] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _answer_field_needed(self) -> "SourceSpec":
        if self.answer_from != "boxed_solution" and self.answer_field is None:
            raise FieldProblem("answer_field", f"required when answer_from is {self.answer_from!r}")
        return self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "SourceSpec":
        """Build a spec from a config mapping; ``where`` locates it in error
        messages (e.g. ``"configs/benchmarks.yaml: math500.source"``)."""
        if not isinstance(d, Mapping):
            raise SourceError(f"{where}: expected a mapping of source fields, got {_show(d)}")
        try:
            return cls.model_validate(dict(d))
        except ValidationError as e:
            lines = [f"{where}: {p.message}" if p.key_in_message else f"{where}.{p.key}: {p.message}"
                     for p in validation_problems(e, cls)]
            raise SourceError("\n".join(lines)) from None

    @property
    def answer_column(self) -> str:
        """The column the gold answer is derived from."""
        if self.answer_from == "boxed_solution":
            return self.solution_field
        assert self.answer_field is not None  # enforced by the validator
        return self.answer_field


# ------------------------------------------------------- validation error messages

def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside an annotation (``Optional[M]``, ``Annotated[M, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field_info = model.model_fields.get(part) if isinstance(part, str) else None
        if field_info is None:
            return None
        model = _model_in(field_info.annotation)
        if model is None:
            return None
    return model


def _explain(err: dict) -> str:
    """One pydantic error as a short sentence (no pydantic wording, no URL)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, _brief(err.get("input"))
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
              "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}
    if kind in bounds:
        op, name = bounds[kind]
        bound = ctx.get(name)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound}, got {got}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {got}"
    if kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"needs at least {n} items, got {got}"
    expected = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
        "string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
        "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
        "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
    }.get(kind)
    if expected:
        return f"expected {expected}, got {got}"
    return f"{err['msg']}, got {got}"


class Problem(typing.NamedTuple):
    """One validation error: the dotted key it is about and a short message. When
    ``key_in_message`` is true the message already quotes the key (unknown / missing
    keys), so callers print ``<where>: <message>``; else ``<where>: <key>: <message>``."""

    key: str
    message: str
    key_in_message: bool = False


def validation_problems(exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """A pydantic ValidationError raised while validating ``model`` as Problems,
    keys relative to ``model``."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, FieldProblem):
            loc += tuple(error.key.split("."))
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = f" (known: {', '.join(parent.model_fields)})" if parent is not None else ""
            out.append(Problem(dotted, f"unknown key {dotted!r}{known}", True))
        elif err["type"] == "missing":
            out.append(Problem(dotted, f"missing required key {dotted!r}", True))
        else:
            out.append(Problem(dotted, _explain(err)))
    return out


# ------------------------------------------------------------------ answer parsing

_BOX_RE = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")


def find_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched (nested groups, escaped ``\\{``/``\\}`` are literal). A box
    nested inside another box belongs to the outer one; "last" means the last
    top-level box. ``\\boxed 5`` (no braces) gives the following token. Returns
    None when there is no complete box.
    """
    if not isinstance(text, str):
        return None
    found: str | None = None
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i)
            if end is None:  # unbalanced: not a box, keep looking after it
                pos = m.end()
                continue
            found = text[i + 1:end].strip()
            pos = end + 1
        elif i > m.end() and i < len(text):  # "\boxed 5"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found = tok.group(0)
            pos = i + (tok.end() if tok else 1)
        else:
            pos = m.end()


def _match_brace(text: str, open_idx: int) -> int | None:
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # \{ \} \\ are escapes, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def _gsm8k_answer(text: Any) -> str | None:
    """Text after the last '####' (thousands separators removed: 2,125 -> 2125)."""
    if not isinstance(text, str) or "####" not in text:
        return None
    ans = text.rsplit("####", 1)[1].strip()
    if _THOUSANDS.fullmatch(ans):
        ans = ans.replace(",", "")
    return ans or None


class _BadValue(Exception):
    pass


def _render_gold(value: Any) -> str | None:
    """Gold value -> text. None/empty -> None; 27.0 -> "27"; lists joined by ", "."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _BadValue(f"a boolean ({value!r}) is not an answer")
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise _BadValue(f"{value!r} is not an answer")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [_render_gold(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) or None
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _render_gold(value.item())
    raise _BadValue(f"unsupported value type {type(value).__name__}")


def _as_text(value: Any) -> str | None:
    """Solution text for boxed extraction: lists (OlympiadBench) joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(v for v in value if isinstance(v, str))
    return None


def prompt_id_for(source: str, problem: str) -> str:
    """Stable id of a problem within a source: sha1(source NUL problem)[:16]."""
    return hashlib.sha1(f"{source}\x00{problem}".encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------ raw readers

def _is_local(path: str) -> bool:
    p = path.strip()
    return (p.lower().endswith(LOCAL_SUFFIXES) or p.startswith(("/", "./", "../", "~"))
            or os.path.isfile(p))


def _resolve_local(path: str, base_dir: str | os.PathLike | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = []
        if base_dir is not None:
            candidates.append(Path(base_dir) / p)
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.is_file():
            return c
    for c in candidates:
        if c.exists():
            raise SourceError(f"{c}: is not a regular file")
    tried = ", ".join(str(c) for c in candidates)
    raise SourceError(f"{path}: file not found (tried: {tried})")


# A raw table: list of column names, and (locator, row-dict) pairs.
_Rows = list[tuple[str, dict]]


def _decode_lines(path: Path) -> Iterable[tuple[int, str]]:
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(
                    f"{path}: line {lineno}: not valid UTF-8 (byte offset {offset + e.start} "
                    f"in the file: {e.reason})") from None
            if lineno == 1:
                text = text.lstrip("\ufeff")
            offset += len(raw)
            yield lineno, text


def _read_jsonl(path: Path) -> tuple[list[str], _Rows]:
    rows: _Rows = []
    columns: dict[str, None] = {}
    for lineno, text in _decode_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(
                f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SourceError(
                f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        rows.append((f"line {lineno}", obj))
    return list(columns), rows


def _read_json(path: Path) -> tuple[list[str], _Rows]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SourceError(f"{path}: line {line}: not valid UTF-8 (byte offset {e.start} "
                          f"in the file: {e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" files are really JSON lines; that reader reports the line.
        return _read_jsonl(path)
    if not isinstance(obj, list):
        raise SourceError(f"{path}: expected a JSON array of objects (or JSON lines), "
                          f"got a top-level {type(obj).__name__}")
    rows: _Rows = []
    columns: dict[str, None] = {}
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise SourceError(
                f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
        columns.update(dict.fromkeys(item))
        rows.append((f"item {i}", item))
    return list(columns), rows


def _read_parquet(path: Path, needed: list[str]) -> tuple[list[str], _Rows]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise SourceError(f"{path}: reading parquet needs pyarrow ({e})") from None
    try:
        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)
        present = [c for c in needed if c in columns]
        table = pf.read(columns=present)
    except Exception as e:  # ArrowInvalid, OSError, ...
        raise SourceError(f"{path}: cannot read as parquet: {type(e).__name__}: {e}") from None
    data = table.to_pylist()
    return columns, [(f"row {i}", r) for i, r in enumerate(data, start=1)]


def _read_hub(spec: SourceSpec, needed: list[str]) -> tuple[str, list[str], _Rows]:
    label = f"HF dataset {spec.path!r}" + (f" (subset {spec.subset!r})" if spec.subset else "") \
        + f" split {spec.split!r}"
    try:
        import datasets
    except ImportError as e:
        raise SourceError(f"{label}: loading from the HF hub needs `datasets` ({e})") from None
    try:
        ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as e:
        raise SourceError(f"{label}: could not load: {type(e).__name__}: {e}") from e
    try:
        columns = list(ds.column_names)
        present = [c for c in needed if c in columns]
        cols = {c: list(ds[c]) for c in present}
        n = len(ds)
    except Exception as e:
        raise SourceError(f"{label}: could not read rows: {type(e).__name__}: {e}") from e
    rows = [(f"row {i + 1}", {c: cols[c][i] for c in present}) for i in range(n)]
    return label, columns, rows


# ------------------------------------------------------------------ loading

def load_problems(spec: SourceSpec,
                  base_dir: str | os.PathLike | None = None) -> tuple[list[dict], dict]:
    """Load a source as ``prompts`` rows.

    Returns ``(rows, stats)``: rows in file order, each
    ``{"prompt_id", "problem", "gold", "source"}`` (gold is text); stats
    ``{"rows", "skipped_no_gold", "skipped_no_problem", "skipped_duplicate"}``.
    Rows with an empty/missing problem or gold are skipped and counted; if more
    than half of the rows are skipped (or all), a SourceError is raised, since
    that almost always means a wrong column mapping. A repeated problem (same
    prompt_id) keeps its first occurrence. ``spec.limit`` keeps the first N
    usable rows; the skip counts cover the whole file.
    """
    if not isinstance(spec, SourceSpec):
        raise SourceError(f"load_problems: expected a SourceSpec, got {_show(spec)}")
    needed = list(dict.fromkeys([spec.problem_field, spec.answer_column]))
    if _is_local(spec.path):
        path = _resolve_local(spec.path, base_dir)
        suffix = path.suffix.lower()
        label = str(path)
        if suffix == ".jsonl":
            columns, raw = _read_jsonl(path)
        elif suffix == ".json":
            columns, raw = _read_json(path)
        elif suffix == ".parquet":
            columns, raw = _read_parquet(path, needed)
        else:
            raise SourceError(f"{path}: unsupported file type {suffix or '(none)'!r} "
                              f"(expected one of {', '.join(LOCAL_SUFFIXES)})")
    else:
        label, columns, raw = _read_hub(spec, needed)

    if not raw:
        raise SourceError(f"{label}: no rows (empty data set) for source {spec.name!r}")
    for col, role in ((spec.problem_field, "problem_field"),
                      (spec.answer_column,
                       "solution_field" if spec.answer_from == "boxed_solution"
                       else "answer_field")):
        if col not in columns:
            raise SourceError(
                f"{label}: column {col!r} ({role} of source {spec.name!r}) not found; "
                f"columns present: {', '.join(map(str, columns)) or '(none)'}")

    out: list[dict] = []
    seen: set[str] = set()
    no_gold, no_problem, dup = [], [], 0
    for loc, row in raw:
        problem = row.get(spec.problem_field)
        if problem is not None and not isinstance(problem, str):
            raise SourceError(f"{label}: {loc}: column {spec.problem_field!r} should be "
                              f"text, got {_show(problem)}")
        if problem is None or not problem.strip():
            no_problem.append(loc)
            continue
        value = row.get(spec.answer_column)
        try:
            if spec.answer_from == "field":
                gold = _render_gold(value)
            elif spec.answer_from == "gsm8k":
                gold = _gsm8k_answer(value)
            else:
                gold = find_boxed(_as_text(value)) or None
        except _BadValue as e:
            raise SourceError(f"{label}: {loc}: column {spec.answer_column!r}: {e}") from None
        if gold is None:
            no_gold.append(loc)
            continue
        pid = prompt_id_for(spec.name, problem)
        if pid in seen:
            dup += 1
            continue
        seen.add(pid)
        solution = row.get(spec.solution_field)  # the SFT-on-gold target, where a source has one
        out.append({"prompt_id": pid, "problem": problem, "gold": gold, "source": spec.name,
                    "solution": solution if isinstance(solution, str) else ""})

    total = len(raw)
    bad = len(no_gold) + len(no_problem)
    if bad * 2 > total:
        examples = ", ".join((no_problem + no_gold)[:3])
        raise SourceError(
            f"{label}: {bad} of {total} rows of source {spec.name!r} are unusable "
            f"({len(no_problem)} without a problem in {spec.problem_field!r}, "
            f"{len(no_gold)} without a gold answer from {spec.answer_column!r} via "
            f"answer_from={spec.answer_from!r}; e.g. {examples}); check the column mapping")
    if spec.limit is not None:
        out = out[:spec.limit]
    stats = {"rows": len(out), "skipped_no_gold": len(no_gold),
             "skipped_no_problem": len(no_problem), "skipped_duplicate": dup}
    return out, stats


# ------------------------------------------------------------------ registry

def default_registry_path() -> Path:
    """``configs/benchmarks.yaml`` of this installation."""
    return Path(__file__).resolve().parents[1] / "configs" / "benchmarks.yaml"


def load_benchmark_registry(
        path: str | os.PathLike | None = None) -> dict[str, tuple[SourceSpec, str]]:
    """Read a benchmark registry: ``{benchmark: (SourceSpec, template name)}``.

    File layout (YAML)::

        math500:
          template: qwen-boxed          # optional, default qwen-boxed
          source: {name: math500, path: HuggingFaceH4/MATH-500, split: test,
                   problem_field: problem, answer_field: answer}

    ``source.name`` defaults to the benchmark key. Relative local paths are
    resolved by :func:`load_problems`; pass ``base_dir=Path(path).parent``.
    """
    import yaml

    path = Path(path) if path is not None else default_registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"{path}: benchmark registry not found") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SourceError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise SourceError(f"{path}: expected a non-empty mapping of benchmark name -> entry")
    out: dict[str, tuple[SourceSpec, str]] = {}
    for key, entry in doc.items():
        where = f"{path}: {key}"
        if not isinstance(key, str):
            raise SourceError(f"{path}: benchmark names must be strings, got {_show(key)}")
        if not isinstance(entry, dict):
            raise SourceError(f"{where}: expected a mapping with 'source' and 'template', "
                              f"got {_show(entry)}")
        unknown = [k for k in entry if k not in ("source", "template")]
        if unknown:
            raise SourceError(f"{where}: unknown key {unknown[0]!r} "
                              f"(allowed: source, template)")
        if "source" not in entry:
            raise SourceError(f"{where}: missing required key 'source'")
        template = entry.get("template", DEFAULT_TEMPLATE)
        if not isinstance(template, str) or not template.strip():
            raise SourceError(f"{where}.template: expected a non-empty string, "
                              f"got {_show(template)}")
        src = entry["source"]
        if isinstance(src, dict) and "name" not in src:
            src = {"name": key, **src}
        out[key] = (SourceSpec.from_dict(src, f"{where}.source"), template)
    return out
