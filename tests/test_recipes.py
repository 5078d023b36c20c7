"""Recipes (pipeline/recipes.py): named runs, sweeps, chains; their stage graph and what
re-runs when one run changes (the real plan and runner; each stage's work replaced by
a fake that writes what its identity says, so no Ray is needed)."""
import hashlib
import json

import pytest

from actors.store import RunStore
from pipeline.config import CONFIG_DIR, ConfigError, load_config
from pipeline.plan import build_stages
from pipeline.recipes import expand_runs
from pipeline.runner import run_stages

RECIPE = CONFIG_DIR / "toy-implicit-reward.yaml"


def test_sweeps_and_chains_expand_into_readable_stable_names():
    runs = expand_runs([], None, [{"objective": "sft", "lr": [5e-4, 5e-5]},
                                  {"objective": "chi2", "data": "gold"},
                                  {"objective": "dpo", "init": ["sft", "chi2"], "beta": [0.1, 0.5]}])
    assert [r.name for r in runs] == [
        "sft@lr=0.0005", "sft@lr=5e-05", "chi2",
        "sft@lr=0.0005+dpo@beta=0.1", "sft@lr=0.0005+dpo@beta=0.5", "sft@lr=5e-05+dpo@beta=0.1",
        "sft@lr=5e-05+dpo@beta=0.5", "chi2+dpo@beta=0.1", "chi2+dpo@beta=0.5"]
    child = runs[3]
    assert (child.init, child.reference, child.hyper, child.data) == ("sft@lr=0.0005", "sft@lr=0.0005",
                                                                      {"beta": 0.1}, "pairs")
    assert runs[2].reference == "base" and runs[0].reference is None


def test_reference_can_be_the_base_and_objectives_keep_their_meaning():
    runs = expand_runs(["rft", "dpo"], {"rft": "positives"}, [{"objective": "dpo", "name": "d2", "init": "rft",
                                                                 "reference": "base"}], dpo_lr=1e-5)
    assert [(r.name, r.init, r.reference, r.hyper) for r in runs] == [
        ("rft", "base", None, {}), ("dpo", "base", "base", {"lr": 1e-5}), ("rft+d2", "rft", "base", {})]


@pytest.mark.parametrize("runs, key", [
    ("[{objective: dpo, init: nope}]", "train.runs[0].init"),
    ("[{objective: sft}, {objective: sft}]", "train.runs[1].name"),
    ("[{objective: sft, lr: [1.0e-5, 1.0e-5]}]", "train.runs[0].lr"),
    ("[{objective: dpo, data: gold}]", "train.runs[0].data"),
])
def test_bad_recipes_fail_at_load_naming_the_key(runs, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.objectives=[]", f"train.runs={runs}"])
    assert key in str(e.value)


def _fake(stage):
    """The stage's work replaced by writing its identity-relevant inputs: output content
    changes exactly when the real stage's would be recomputed."""
    def run(ctx):
        digests = {i: ctx.upstream[i]["output_digest"] for i in ctx.stage.inputs}
        blob = json.dumps([ctx.stage.config_dump(), digests], sort_keys=True, default=str)
        out = f"{ctx.work_dir}/out.json"
        ctx.store.write_bytes(out, hashlib.sha256(blob.encode()).hexdigest().encode())
        ran.append(ctx.stage.name)
        return [out], {}
    stage.run = run
    return stage


ran: list[str] = []


def _run(store, overrides=()):
    ran.clear()
    cfg = load_config(RECIPE, list(overrides))
    run_stages(store, [_fake(s) for s in build_stages(cfg)], log=lambda *_: None)
    return set(ran)


def test_changing_one_runs_lr_reruns_only_it_its_chain_and_their_evaluations(tmp_path):
    store = RunStore(str(tmp_path))
    first = _run(store)
    assert "train/sft@lr=5e-05+dpo" in first and "reference/chi2" in first
    assert _run(store) == set()
    runs = ("[{objective: sft, lr: [5.0e-4, 5.0e-5], diagnostics: true}, {objective: chi2, data: gold, lr: 1.0e-4},"
            " {objective: hellinger, data: gold}, {objective: dpo, init: [sft, chi2, hellinger], lr: 1.0e-5}]")
    again = _run(store, [f"train.runs={runs}"])
    assert again == {"train/chi2", "reference/chi2", "train/chi2+dpo", "eval/chi2/toy_id", "eval/chi2/toy_harder",
                     "eval/chi2+dpo/toy_id", "eval/chi2+dpo/toy_harder", "report"}


def test_chain_stages_read_the_parents_model_and_reference():
    stages = {s.name: s for s in build_stages(load_config(RECIPE))}
    child = stages["train/sft@lr=5e-05+dpo"]
    assert set(child.inputs) == {"verify", "reference/sft@lr=5e-05", "train/sft@lr=5e-05"}
    assert child.config["init"] == "sft@lr=5e-05" and child.config["reference"] == "sft@lr=5e-05"
    assert "base_model" not in child.external  # it starts from the parent, not the base
    ref = stages["reference/sft@lr=5e-05"]
    assert ref.inputs == ["verify", "train/sft@lr=5e-05"] and ref.config["reference_sets"] == ["pairs"]
    gold_ref = stages["reference/base"]
    assert gold_ref.config["reference_sets"] == ["gold"] and gold_ref.inputs == ["prompts"]
    assert stages["train/chi2"].config["data"] == "gold" and "reference/base" in stages["train/chi2"].inputs


def test_shipped_recipe_configs_build_their_graphs():
    for name in ("toy-implicit-reward.yaml", "qwen2.5-math-1.5b-implicit-reward.yaml"):
        cfg = load_config(CONFIG_DIR / name)
        names = {s.name for s in build_stages(cfg)}
        assert {"report", "reference/base"} <= names
        assert any("+dpo" in n for n in names) and any("@lr=" in n for n in names)
