"""Property test over the whole config: changing any leaf key changes the identity of
exactly the stages whose output depends on it (EXPECTED below, written from what each
stage computes), and nothing else. Keys that change no output are the ones declared in
config.NO_OUTPUT_EFFECT; an undeclared key that changes no identity fails."""
import typing

import pytest

from pipeline.config import NO_OUTPUT_EFFECT, REFERENCE_OBJECTIVES, Config, leaf_keys, load_config
from pipeline.plan import build_stages
from pipeline.runner import stage_identity

TRAIN = {f"train/{o}" for o in ("rft", "dft", "dpo", "chi2", "hellinger")}
EVAL = {f"eval/{m}/{b}" for m in ("base", "rft", "dft", "dpo", "chi2", "hellinger") for b in ("toy_id", "toy_harder")}
EVAL_BASE = {e for e in EVAL if e.startswith("eval/base/")}
BASE_MODEL_READERS = {"sample", "reference/base", "report"} | TRAIN | EVAL_BASE

# key -> stages whose own identity must change (on configs/toy.yaml). Downstream stages
# follow through their inputs' content, at run time.
EXPECTED = {
    "run.seed": {"prompts", "sample", *TRAIN, *EVAL, "reference/base", "report"},  # and the toy base model's build
    "model.base": BASE_MODEL_READERS,
    "model.dtype": {"sample", *EVAL},
    "data.source": {"prompts"}, "data.toy_count": {"prompts"},
    "sample.n": {"sample", "verify"},
    "sample.temperature": {"sample"}, "sample.top_p": {"sample"}, "sample.max_tokens": {"sample"},
    "sample.template": {"sample"},
    "sample.gpus_per_engine": {"sample", *EVAL}, "sample.block_size": {"sample", *EVAL},
    "sample.max_model_len": {"sample", *EVAL}, "sample.stop": {"sample", *EVAL},
    "verify.deadline_s": {"verify", *EVAL},
    "verify.max_positives_per_prompt": {"verify"}, "verify.max_pairs_per_prompt": {"verify"},
    "train.data": {"train/rft"},
    "train.lr": TRAIN - {"train/dpo"},  # toy.yaml gives DPO its own dpo_lr
    "train.dpo_lr": {"train/dpo"}, "train.dpo_batch_size": {"train/dpo"},
    "train.beta": {f"train/{o}" for o in ("dpo", "chi2", "hellinger")},
    "train.max_len": {*TRAIN, "reference/base", "report"}, "train.use_gpu": {*TRAIN, "reference/base", "report"},
    **{f"train.{k}": TRAIN for k in ("batch_size", "micro_batch_tokens", "epochs", "warmup_ratio", "weight_decay",
                                     "grad_clip", "num_workers", "zero_stage", "precision", "optimizer")},
    **{f"eval.{k}": EVAL for k in ("temperature", "top_p", "max_tokens", "limit")},
    "eval.n": {*EVAL, "report"},
}
# Keys that change which stages exist (the plan itself): checked by the stage set.
SHAPE = {"train.objectives": {"removed": {"train/hellinger", "eval/hellinger/toy_id", "eval/hellinger/toy_harder"},
                              "changed": {"report"}},
         "eval.benchmarks": {"removed": {e for e in EVAL if e.endswith("toy_harder")}, "changed": {"report"}},
         "eval.models": {"removed": EVAL - EVAL_BASE - {"eval/rft/toy_id", "eval/rft/toy_harder"},
                         "changed": {"report"}},
         "train.runs": {"added": {"train/rft+sft", "eval/rft+sft/toy_id", "eval/rft+sft/toy_harder"},
                        "changed": {"report"}}}
SPECIAL = {"train.objectives": "[rft, dft, dpo, chi2]", "eval.benchmarks": "[toy_id]", "eval.models": "[base, rft]",
           "train.data": "{rft: gold}", "train.runs": "[{objective: sft, init: rft}]", "model.base": "some-org/some-model", "run.dir": "/tmp/elsewhere",
           "ray.address": "auto", "ray.worker_resource": "worker_node",
           "sample.template": "qwen-boxed", "model.dtype": "bfloat16", "train.precision": "bf16",
           "train.optimizer": "sgd", "train.zero_stage": "3", "sample.stop": "['</answer>']"}


def _declared(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NO_OUTPUT_EFFECT)


def _perturbed(key: str, value, tmp_path) -> str:
    """A different valid value for `key`, as override text."""
    if key == "data.source":
        path = tmp_path / "prompts.jsonl"
        path.write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n')
        return f"{{name: mine, path: {path}}}"
    if key == "eval.registry":  # the same entries, read from elsewhere
        from pipeline.config import CONFIG_DIR

        path = tmp_path / "registry.yaml"
        path.write_text((CONFIG_DIR / "benchmarks.yaml").read_text())
        return str(path)
    if key in SPECIAL:
        return SPECIAL[key]
    if isinstance(value, bool):
        return str(not value).lower()
    if value is None:
        return "0.5" if key == "train.dpo_lr" else "7"
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return repr(value / 2 if value else 0.25)
    raise AssertionError(f"no perturbation for {key}={value!r}: add one to SPECIAL")


def _identities(cfg) -> dict[str, str]:
    """Each stage's own identity, with its inputs' content held fixed."""
    return {s.name: stage_identity(s, {i: "same-content" for i in s.inputs}) for s in build_stages(cfg)}


def _value(cfg, key):
    node = cfg
    for k in key.split("."):
        node = getattr(node, k)
    return node


BASE_CFG = load_config()


@pytest.mark.parametrize("key", leaf_keys(BASE_CFG))
def test_a_key_changes_exactly_the_stages_that_read_it(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id's revision is not looked up here
    before = _identities(BASE_CFG)
    after = _identities(load_config(None, [f"{key}={_perturbed(key, _value(BASE_CFG, key), tmp_path)}"]))
    changed = {s for s in before if s in after and before[s] != after[s]}
    removed, added = set(before) - set(after), set(after) - set(before)
    if key in SHAPE:
        expected = SHAPE[key]
        assert (removed, added, changed) == (expected.get("removed", set()), expected.get("added", set()),
                                             expected["changed"])
    elif _declared(key):
        assert (changed, removed, added) == (set(), set(), set()), f"{key} is declared to change no output"
    else:
        assert changed or removed or added, (f"{key} changes no stage's identity: declare it in "
                                             f"config.NO_OUTPUT_EFFECT if it really changes no output")
        assert key in EXPECTED, f"{key}: add the stages whose output depends on it to EXPECTED"
        assert (changed, removed, added) == (EXPECTED[key], set(), set())


def test_every_declared_key_exists():
    keys = leaf_keys(BASE_CFG)
    for k in NO_OUTPUT_EFFECT:
        assert any(x == k or x.startswith(k + ".") for x in keys), k


def test_reference_objectives_match_the_objectives_module():
    from actors.objectives import OBJECTIVE_SPECS

    assert set(REFERENCE_OBJECTIVES) == {o for o, s in OBJECTIVE_SPECS.items() if s.needs_reference}


def test_a_stage_cannot_read_a_key_it_was_not_given():
    from pipeline.runner import ConfigView

    verify = next(s for s in build_stages(BASE_CFG) if s.name == "verify")
    view = ConfigView(verify.config, verify.name)
    assert view.verify.deadline_s == BASE_CFG.verify.deadline_s
    with pytest.raises(AttributeError, match="sample.temperature"):
        view.sample.temperature
