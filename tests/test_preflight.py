"""Preflight: input errors (data file, columns, model, benchmarks) found before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.preflight import check_inputs

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "configs" / "benchmarks.yaml"
SHARED = REPO.parent / "shared" / "data" / "benchmarks"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared benchmark files not found at {SHARED}")


def config(tmp_path: Path, name: str = "run.yaml", **sections) -> tuple:
    """A config file in tmp_path/cfgdir and a one-entry toy registry next to it."""
    cfg_dir = tmp_path / "cfgdir"
    cfg_dir.mkdir(exist_ok=True)
    sections.setdefault("eval", {"benchmarks": ["toy_id"]})
    path = cfg_dir / name
    path.write_text(yaml.safe_dump(sections))
    registry = cfg_dir / "reg.yaml"
    if not registry.exists():
        registry.write_text("toy_id:\n  template: chat\n  source: {name: toy, path: 'toy:id', limit: 5}\n")
    return load_config(path), registry


def fails(cfg, registry, *fragments: str) -> str:
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg, registry)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def source(path, **kw) -> dict:
    return {"source": {"name": "s", "path": str(path), **kw}}


def test_toy_config_passes():
    check_inputs(load_config(), REGISTRY)


# ------------------------------------------------------------------ data.source

def test_missing_data_file(tmp_path):
    cfg, reg = config(tmp_path, data=source("nope.jsonl"))
    fails(cfg, reg, cfg.source_file, "data.source.path", "nope.jsonl: file not found", "tried:")


def test_relative_data_path_is_resolved_against_the_config_dir(tmp_path, monkeypatch):
    cfg, reg = config(tmp_path, data=source("train.jsonl"))
    jsonl(tmp_path / "cfgdir" / "train.jsonl", [{"problem": "p", "answer": "1"}])
    monkeypatch.chdir(tmp_path)  # not the config's directory
    check_inputs(cfg, reg)


def test_relative_data_path_falls_back_to_cwd(tmp_path, monkeypatch):
    cfg, reg = config(tmp_path, data=source("data/train.jsonl"))
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "train.jsonl", [{"problem": "p", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    check_inputs(cfg, reg)


def test_missing_problem_and_answer_columns(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    cfg, reg = config(tmp_path, data=source(f))
    fails(cfg, reg, f"{cfg.source_file}: data.source.problem_field: column 'problem' is not in",
          "columns: question, answer")
    cfg, reg = config(tmp_path, data=source(f, problem_field="question", answer_field="final"))
    fails(cfg, reg, "data.source.answer_field: column 'final'")
    cfg, reg = config(tmp_path, data=source(f, problem_field="question", answer_from="boxed_solution"))
    fails(cfg, reg, "data.source.solution_field: column 'solution'")
    cfg, reg = config(tmp_path, data=source(f, problem_field="question"))
    check_inputs(cfg, reg)


def test_reads_only_the_first_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('\n{"problem": "p", "answer": "1"}\nthis line is not JSON\n')
    cfg, reg = config(tmp_path, data=source(f))
    check_inputs(cfg, reg)  # load_problems reports line 3 later; preflight reads line 2 only
    f.write_text('not JSON\n{"problem": "p", "answer": "1"}\n')
    fails(cfg, reg, "data.source.path", "line 1: invalid JSON")


def test_empty_and_unsupported_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    cfg, reg = config(tmp_path, data=source(empty))
    fails(cfg, reg, "data.source.path", "no rows")
    csv = tmp_path / "d.csv"
    csv.write_text("problem,answer\n")
    cfg, reg = config(tmp_path, data=source(csv))
    fails(cfg, reg, "data.source.path", "unsupported file type '.csv'")


def test_json_array_first_item(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"question": "q", "answer": 3}] + [{"x": i} for i in range(3000)], indent=1))
    cfg, reg = config(tmp_path, data=source(f))
    fails(cfg, reg, "data.source.problem_field: column 'problem'", "columns: question, answer")
    cfg, reg = config(tmp_path, data=source(f, problem_field="question"))
    check_inputs(cfg, reg)
    f.write_text("[ ]")
    fails(cfg, reg, "data.source.path", "empty JSON array")
    f.write_text('{"question": "q", "answer": 1}\n{"question": "r", "answer": 2}\n')  # JSON lines in .json
    check_inputs(cfg, reg)


def test_parquet_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["a"], "final_answer": [["1"]]}), f)
    cfg, reg = config(tmp_path, data=source(f))
    fails(cfg, reg, "data.source.problem_field: column 'problem'", "columns: question, final_answer")
    cfg, reg = config(tmp_path, data=source(f, problem_field="question", answer_field="final_answer"))
    check_inputs(cfg, reg)
    f.write_bytes(b"not parquet")
    fails(cfg, reg, "data.source.path", "cannot read as parquet")


def test_hub_data_source_is_not_checked(tmp_path):
    cfg, reg = config(tmp_path, data=source("AI-MO/NuminaMath-CoT"))
    check_inputs(cfg, reg)


# ------------------------------------------------------------------ model.base

@pytest.mark.parametrize("base", ["toy", "Qwen/Qwen2.5-Math-1.5B", "gpt2", "org-1/model_v2.5"])
def test_valid_model_names(tmp_path, base):
    cfg, reg = config(tmp_path, model={"base": base})
    check_inputs(cfg, reg)


@pytest.mark.parametrize("base", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-model-xyz"])
def test_missing_model_directory(tmp_path, base):
    cfg, reg = config(tmp_path, model={"base": base})
    fails(cfg, reg, f"{cfg.source_file}: model.base: no such model directory {base!r}")


@pytest.mark.parametrize("base", ["Qwen/Qwen2.5/Math", "owner/", "/", "has space", "s3://bucket/model", "a:b"])
def test_invalid_hub_id(tmp_path, base):
    cfg, reg = config(tmp_path, model={"base": base})
    fails(cfg, reg, "model.base:")


def test_model_directory_needs_config_json(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cfg, reg = config(tmp_path, model={"base": str(model)})
    fails(cfg, reg, "model.base:", "has no config.json")
    (model / "config.json").write_text("{}")
    check_inputs(cfg, reg)
    weights = tmp_path / "weights.bin"
    weights.write_text("")
    cfg, reg = config(tmp_path, model={"base": str(weights)})
    fails(cfg, reg, "model.base:", "is not a directory")


# ------------------------------------------------------------------ eval.benchmarks

def test_unknown_benchmark(tmp_path):
    cfg, reg = config(tmp_path, eval={"benchmarks": ["toy_id", "math5000"]})
    fails(cfg, reg, f"{cfg.source_file}: eval.benchmarks: 'math5000' is not in {reg}", "known: toy_id")


def test_missing_registry(tmp_path):
    cfg, _ = config(tmp_path)
    fails(cfg, tmp_path / "none.yaml", "eval.registry", "benchmark registry not found")


def test_benchmark_with_missing_local_file(tmp_path):
    cfg, reg = config(tmp_path, eval={"benchmarks": ["toy_id", "mine"]})
    reg.write_text(reg.read_text() + "mine:\n  source: {path: gone.jsonl}\n")
    fails(cfg, reg, f"{reg}: mine.source.path:", "gone.jsonl: file not found")
    jsonl(reg.parent / "gone.jsonl", [{"problem": "p", "answer": "1"}])  # relative to the registry
    check_inputs(cfg, reg)
    jsonl(reg.parent / "gone.jsonl", [{"q": "p", "answer": "1"}])
    fails(cfg, reg, f"{reg}: mine.source.problem_field: column 'problem'")


def test_hub_benchmarks_are_not_downloaded():
    cfg = load_config(REPO / "configs" / "qwen2.5-math-1.5b.yaml")
    check_inputs(cfg, REGISTRY)


@needs_shared
def test_real_benchmark_files_pass(monkeypatch):
    monkeypatch.chdir(REPO)  # the registry's ../shared paths are relative to the repo root
    names = [n for n in yaml.safe_load(REGISTRY.read_text()) if n.startswith("local_")]
    assert len(names) >= 6
    check_inputs(load_config(None, [f"eval.benchmarks=[{', '.join(names)}]"]), REGISTRY)


@needs_shared
def test_real_benchmark_file_as_training_source(tmp_path):
    cfg, reg = config(tmp_path, data=source(SHARED / "gsm8k.jsonl", problem_field="question",
                                            answer_from="gsm8k"))
    check_inputs(cfg, reg)
    cfg, reg = config(tmp_path, data=source(SHARED / "gsm8k.jsonl"))
    fails(cfg, reg, "data.source.problem_field: column 'problem'", "question")
