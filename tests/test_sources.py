"""Data sources: local benchmark files through the registry, bad inputs, parquet, \\boxed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.sources import (
    SourceError,
    SourceSpec,
    default_registry_path,
    find_boxed,
    load_benchmark_registry,
    load_problems,
    prompt_id_for,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data/benchmarks"
REGISTRY = REPO / "configs" / "benchmarks.yaml"

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"shared benchmark files not found at {SHARED} (they sit beside the repo checkout)")

EXPECTED_ROWS = {
    "local_math500": 500,
    "local_minerva_math": 272,
    "local_olympiadbench": 675,
    "local_aime24": 30,
    "local_amc23": 40,
    "local_gsm8k": 1319,
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _spec(path: Path | str, **kw) -> SourceSpec:
    return SourceSpec(**{"name": "t", "path": str(path), **kw})


# ---------------------------------------------------------------- registry

def test_registry_structure():
    reg = load_benchmark_registry(REGISTRY)
    assert default_registry_path() == REGISTRY
    for bench in ("math500", "minerva_math", "olympiadbench", "aime24", "amc23"):
        assert bench in reg and f"local_{bench}" in reg
        hub, template = reg[bench]
        local, ltemplate = reg[f"local_{bench}"]
        assert template == ltemplate == "qwen-boxed"
        assert "/" in hub.path and not hub.path.endswith(".jsonl")
        assert local.path.startswith("../shared/data/benchmarks/")
        assert hub.name == local.name == bench
    assert reg["olympiadbench"][0].subset == "OE_TO_maths_en_COMP"
    assert reg["olympiadbench"][0].answer_field == "final_answer"
    assert reg["amc23"][0].problem_field == "question"
    assert reg["local_gsm8k"][0].answer_from == "gsm8k"
    assert reg["local_minerva_math"][0].answer_from == "boxed_solution"


@needs_shared
@pytest.mark.parametrize("bench", sorted(EXPECTED_ROWS))
def test_local_benchmarks_load_through_registry(bench, monkeypatch):
    monkeypatch.chdir(REPO)  # registry paths are relative to the repo root
    spec, _ = load_benchmark_registry(REGISTRY)[bench]
    rows, stats = load_problems(spec, base_dir=REGISTRY.parent)
    assert len(rows) == EXPECTED_ROWS[bench]
    assert stats == {"rows": EXPECTED_ROWS[bench], "skipped_no_gold": 0,
                     "skipped_no_problem": 0, "skipped_duplicate": 0}
    assert all(set(r) == {"prompt_id", "problem", "gold", "source", "solution"} for r in rows)
    assert all(isinstance(r["gold"], str) and r["gold"].strip() for r in rows)
    assert all(r["problem"].strip() and r["source"] == spec.name for r in rows)
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    again, _ = load_problems(spec, base_dir=REGISTRY.parent)
    assert [r["prompt_id"] for r in again] == ids  # stable across loads, file order


@needs_shared
def test_local_benchmark_gold_values(monkeypatch):
    monkeypatch.chdir(REPO)
    reg = load_benchmark_registry(REGISTRY)
    load = lambda b: load_problems(reg[b][0], base_dir=REGISTRY.parent)[0]
    amc = load("local_amc23")
    assert amc[0]["gold"] == "27"  # 27.0 in the file
    assert all("." not in r["gold"] for r in amc)
    gsm = load("local_gsm8k")
    assert gsm[0]["gold"] == "18"
    assert all("," not in r["gold"] and "####" not in r["gold"] for r in gsm)
    olym = load("local_olympiadbench")
    assert olym[0]["gold"] == "2"
    assert "$69$,$84$" in {r["gold"] for r in olym}
    minerva = load("local_minerva_math")
    first = json.loads((SHARED / "minerva_math.jsonl").read_text().splitlines()[0])
    assert minerva[0]["gold"] == find_boxed(first["solution"])
    assert minerva[0]["gold"]
    math500 = load("local_math500")
    assert math500[0]["gold"] == r"\left( 3, \frac{\pi}{2} \right)"


@needs_shared
def test_relative_path_tries_base_dir_then_cwd(tmp_path, monkeypatch):
    # Relative to base_dir first...
    (tmp_path / "cfg").mkdir()
    _write_jsonl(tmp_path / "cfg" / "a.jsonl", [{"problem": "p", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    rows, _ = load_problems(_spec("a.jsonl"), base_dir=tmp_path / "cfg")
    assert rows[0]["gold"] == "1"
    # ...then relative to the working directory.
    _write_jsonl(tmp_path / "b.jsonl", [{"problem": "q", "answer": "2"}])
    rows, _ = load_problems(_spec("b.jsonl"), base_dir=tmp_path / "cfg")
    assert rows[0]["gold"] == "2"
    # From elsewhere, the registry's ../shared paths do not resolve.
    spec, _ = load_benchmark_registry(REGISTRY)["local_aime24"]
    with pytest.raises(SourceError, match="aime24.jsonl: file not found"):
        load_problems(spec, base_dir=tmp_path / "cfg")


# ---------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match=r"nope\.jsonl: file not found"):
        load_problems(_spec(tmp_path / "nope.jsonl"))


def test_missing_column_lists_columns(tmp_path):
    f = _write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "1", "idx": 0}])
    with pytest.raises(SourceError) as ei:
        load_problems(_spec(f))  # problem_field defaults to "problem"
    msg = str(ei.value)
    assert "cols.jsonl" in msg and "'problem'" in msg
    assert "columns present: question, answer, idx" in msg
    with pytest.raises(SourceError, match="column 'final_answer'.*columns present: question"):
        load_problems(_spec(f, problem_field="question", answer_field="final_answer"))


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"empty\.jsonl: no rows"):
        load_problems(_spec(f))


def test_non_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = (json.dumps({"problem": "p", "answer": "1"}) + "\n").encode()
    f.write_bytes(good + '{"problem": "caf\xe9", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(SourceError) as ei:
        load_problems(_spec(f))
    msg = str(ei.value)
    assert "latin1.jsonl" in msg and "line 2" in msg and "UTF-8" in msg
    assert f"byte offset {len(good) + 16}" in msg


def test_invalid_json_line_number(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"problem": "p", "answer": "1"}\n\n{"problem": "q", "answer": \n',
                 encoding="utf-8")
    with pytest.raises(SourceError, match=r"broken\.jsonl: line 3: invalid JSON"):
        load_problems(_spec(f))


def test_minority_without_gold_is_skipped_and_counted(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    rows[1]["answer"] = None
    rows[3]["answer"] = "  "
    rows.append({"problem": "", "answer": "9"})
    f = _write_jsonl(tmp_path / "some_bad.jsonl", rows)
    out, stats = load_problems(_spec(f))
    assert [r["gold"] for r in out] == ["0", "2", "4"]
    assert stats == {"rows": 3, "skipped_no_gold": 2, "skipped_no_problem": 1,
                     "skipped_duplicate": 0}


def test_majority_without_gold_is_an_error(tmp_path):
    rows = [{"problem": f"p{i}", "answer": None if i < 3 else "1"} for i in range(5)]
    f = _write_jsonl(tmp_path / "mostly_bad.jsonl", rows)
    with pytest.raises(SourceError, match=r"mostly_bad\.jsonl: 3 of 5 rows.*line 1"):
        load_problems(_spec(f))
    f2 = _write_jsonl(tmp_path / "all_bad.jsonl", [{"problem": "p", "answer": ""}])
    with pytest.raises(SourceError, match=r"all_bad\.jsonl: 1 of 1 rows"):
        load_problems(_spec(f2))


def test_per_row_type_error_names_row(tmp_path):
    f = _write_jsonl(tmp_path / "types.jsonl",
                     [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": {"x": 1}}])
    with pytest.raises(SourceError, match=r"types\.jsonl: line 2: column 'answer'"):
        load_problems(_spec(f))
    f2 = _write_jsonl(tmp_path / "types2.jsonl", [{"problem": 5, "answer": "1"}])
    with pytest.raises(SourceError, match=r"types2\.jsonl: line 1: column 'problem'"):
        load_problems(_spec(f2))


def test_unsupported_suffix(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("problem,answer\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"data\.csv: unsupported file type"):
        load_problems(_spec(f))


# ---------------------------------------------------------------- formats / values

def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "question": ["a?", "b?", "c?"],
        "final_answer": [["1"], ["2", "3"], []],
        "extra": [1, 2, 3],
    })
    f = tmp_path / "olym.parquet"
    pq.write_table(table, f)
    rows, stats = load_problems(_spec(f, problem_field="question", answer_field="final_answer"))
    assert [r["gold"] for r in rows] == ["1", "2, 3"]
    assert stats["skipped_no_gold"] == 1
    with pytest.raises(SourceError, match=r"olym\.parquet: column 'problem'.*"
                                          r"columns present: question, final_answer, extra"):
        load_problems(_spec(f))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad\.parquet: cannot read as parquet"):
        load_problems(_spec(bad))


def test_json_array_and_json_lines_named_json(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"problem": "p", "answer": 3}, {"problem": "q", "answer": 0.5}]))
    rows, _ = load_problems(_spec(arr))
    assert [r["gold"] for r in rows] == ["3", "0.5"]
    jl = tmp_path / "lines.json"
    jl.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q" "answer": "2"}\n')
    with pytest.raises(SourceError, match=r"lines\.json: line 2: invalid JSON"):
        load_problems(_spec(jl))


def test_gold_rendering_and_limit_and_duplicates(tmp_path):
    f = _write_jsonl(tmp_path / "vals.jsonl", [
        {"problem": "a", "answer": 27.0},
        {"problem": "b", "answer": 7},
        {"problem": "c", "answer": ["x", "y"]},
        {"problem": "a", "answer": 27.0},  # duplicate problem: first kept
        {"problem": "d", "answer": " 2 "},
    ])
    rows, stats = load_problems(_spec(f))
    assert [r["gold"] for r in rows] == ["27", "7", "x, y", "2"]
    assert stats["skipped_duplicate"] == 1
    rows2, stats2 = load_problems(_spec(f, limit=2))
    assert [r["problem"] for r in rows2] == ["a", "b"] and stats2["rows"] == 2
    assert rows2[0]["prompt_id"] == prompt_id_for("t", "a") == rows[0]["prompt_id"]
    assert prompt_id_for("t", "a") != prompt_id_for("u", "a")
    assert len(prompt_id_for("t", "a")) == 16


def test_gsm8k_and_boxed_solution_modes(tmp_path):
    f = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "q1", "answer": "work <<1+1=2>>\n#### 2,125"},
        {"question": "q2", "answer": "no marker"},
        {"question": "q3", "answer": "x\n#### -4"},
    ])
    rows, stats = load_problems(_spec(f, problem_field="question", answer_from="gsm8k"))
    assert [r["gold"] for r in rows] == ["2125", "-4"] and stats["skipped_no_gold"] == 1
    f2 = _write_jsonl(tmp_path / "s.jsonl", [
        {"problem": "p", "solution": r"so \boxed{1} then \boxed{\frac{1}{2}}"},
        {"problem": "q", "solution": ["step", r"\boxed{5}"]},
    ])
    rows, _ = load_problems(_spec(f2, answer_from="boxed_solution", answer_field=None))
    assert [r["gold"] for r in rows] == [r"\frac{1}{2}", "5"]


def test_hub_source_uses_load_dataset_and_wraps_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, subset=None, split=None):
        calls.append((path, subset, split))
        return datasets.Dataset.from_list(
            [{"question": "q1", "final_answer": ["1", "2"]}, {"question": "q2",
                                                            "final_answer": ["3"]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = SourceSpec(name="olympiadbench", path="Hothan/OlympiadBench",
                      subset="OE_TO_maths_en_COMP", split="train",
                      problem_field="question", answer_field="final_answer")
    rows, stats = load_problems(spec)
    assert calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    assert [r["gold"] for r in rows] == ["1, 2", "3"] and stats["rows"] == 2
    with pytest.raises(SourceError, match=r"'Hothan/OlympiadBench'.*column 'problem'.*"
                                          r"columns present: question, final_answer"):
        load_problems(SourceSpec(name="x", path="Hothan/OlympiadBench"))

    def failing(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(SourceError, match=r"HF dataset 'org/missing'.*ConnectionError: offline"):
        load_problems(SourceSpec(name="x", path="org/missing"))


# ---------------------------------------------------------------- spec validation

def test_from_dict_validation():
    where = "configs/x.yaml: bench.source"
    ok = SourceSpec.from_dict({"name": "a", "path": "p.jsonl", "limit": 3}, where)
    assert ok.limit == 3 and ok.split == "test" and ok.answer_field == "answer"
    with pytest.raises(SourceError, match=r"^configs/x\.yaml: bench\.source: unknown key 'colum' "
                                          r"\(known: name, path, split"):
        SourceSpec.from_dict({"name": "a", "path": "p", "colum": 1}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.limit: expected an integer, got '10'"):
        SourceSpec.from_dict({"name": "a", "path": "p", "limit": "10"}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.limit: expected an integer, got True"):
        SourceSpec.from_dict({"name": "a", "path": "p", "limit": True}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.limit: must be >= 1, got 0"):
        SourceSpec.from_dict({"name": "a", "path": "p", "limit": 0}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.answer_from: expected one of 'field', "
                                          r"'boxed_solution' or 'gsm8k', got 'boxed'"):
        SourceSpec.from_dict({"name": "a", "path": "p", "answer_from": "boxed"}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.split: expected a non-empty string, got int 3"):
        SourceSpec.from_dict({"name": "a", "path": "p", "split": 3}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.name: expected a non-empty string"):
        SourceSpec.from_dict({"name": "  ", "path": "p"}, where)
    with pytest.raises(SourceError, match=r"bench\.source: missing required key 'path'"):
        SourceSpec.from_dict({"name": "a"}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.answer_field: required when answer_from is 'field'"):
        SourceSpec.from_dict({"name": "a", "path": "p", "answer_field": None}, where)
    with pytest.raises(SourceError, match=r"bench\.source\.answer_field: required when answer_from is 'gsm8k'"):
        SourceSpec.from_dict({"name": "a", "path": "p", "answer_field": None, "answer_from": "gsm8k"}, where)
    boxed = SourceSpec.from_dict({"name": "a", "path": "p", "answer_field": None,
                                  "answer_from": "boxed_solution"}, where)
    assert boxed.answer_column == "solution"
    with pytest.raises(SourceError, match=r"bench\.source: expected a mapping"):
        SourceSpec.from_dict(["name"], where)
    with pytest.raises(SourceError) as ei:
        SourceSpec.from_dict({"name": "a", "path": "p", "limit": 0}, where)
    assert "pydantic" not in str(ei.value) and "Input should" not in str(ei.value)


def test_spec_is_a_frozen_hashable_model():
    spec = SourceSpec(name="a", path="p.jsonl", limit=2)
    assert SourceSpec.field_names() == ("name", "path", "split", "subset", "problem_field",
                                        "answer_field", "answer_from", "solution_field", "limit")
    assert spec == SourceSpec.from_dict({"name": "a", "path": "p.jsonl", "limit": 2}, "w")
    assert hash(spec) == hash(SourceSpec(name="a", path="p.jsonl", limit=2))
    assert len({spec, SourceSpec(name="a", path="p.jsonl", limit=2)}) == 1
    with pytest.raises(ValueError):
        spec.limit = 3
    assert spec.model_copy(update={"limit": 3}).limit == 3
    assert spec.model_dump(mode="json")["limit"] == 2
    with pytest.raises(ValueError):  # direct construction validates too
        SourceSpec(name="a", path="p", limit=0)


def test_registry_errors_name_file_and_key(tmp_path):
    f = tmp_path / "reg.yaml"
    f.write_text("b1:\n  template: qwen-boxed\n  source: {path: x.jsonl, problem: q}\n")
    with pytest.raises(SourceError, match=r"reg\.yaml: b1\.source: unknown key 'problem'"):
        load_benchmark_registry(f)
    f.write_text("b1:\n  templat: qwen-boxed\n  source: {path: x.jsonl}\n")
    with pytest.raises(SourceError, match=r"reg\.yaml: b1: unknown key 'templat'"):
        load_benchmark_registry(f)
    f.write_text("b1:\n  source: {path: x.jsonl, limit: 0}\n")
    with pytest.raises(SourceError, match=r"reg\.yaml: b1\.source\.limit: must be >= 1, got 0"):
        load_benchmark_registry(f)
    f.write_text("b1:\n  source: {path: x.jsonl}\n")
    spec, template = load_benchmark_registry(f)["b1"]
    assert spec.name == "b1" and template == "qwen-boxed"
    with pytest.raises(SourceError, match=r"missing\.yaml: benchmark registry not found"):
        load_benchmark_registry(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- find_boxed

@pytest.mark.parametrize("text,expected", [
    (r"\boxed{1}", "1"),
    (r"first \boxed{1}, finally \boxed{2}.", "2"),
    (r"$\boxed{\frac{a}{b^{2}}}$", r"\frac{a}{b^{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
    (r"\fbox{7}", "7"),
    (r"\boxed{1} and \fbox{x^{2}}", "x^{2}"),
    (r"\boxed{\boxed{3}+1}", r"\boxed{3}+1"),
    (r"answer $\boxed 5$", "5"),
    (r"\boxed{1} then \boxed{unclosed", "1"),
    (r"\boxedx{3}", None),
    ("no box here", None),
    ("", None),
    (None, None),
])
def test_find_boxed(text, expected):
    assert find_boxed(text) == expected
