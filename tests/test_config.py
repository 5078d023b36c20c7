import typing

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import (CONFIG_DIR, DEFAULT_CONFIG, NO_OUTPUT_EFFECT, OBJECTIVES, Config, ConfigError,
                             config_from_dict, identity_dump, leaf_keys, load_config, parse_override)
from pipeline.sources import SourceSpec

REPO = CONFIG_DIR.parent

SECTIONS = ("run", "ray", "model", "data", "sample", "verify", "train", "eval")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def write_key(tmp_path, dotted, value):
    """A config file setting one dotted key (section.key) to a YAML value."""
    section, key = dotted.split(".", 1)
    return write(tmp_path, yaml.safe_dump({section: {key: value}}))


def test_default_is_the_toy_config():
    cfg = load_config()
    assert cfg.model.base == "toy" and cfg.source_file == str(DEFAULT_CONFIG)
    assert cfg.data.source is None and cfg.train.gradient_checkpointing is False
    assert cfg.train.report_every == 0


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: unknown key 'train.lrr'")
    assert "known: objectives, runs, data, lr," in msg and "checkpoint_every" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'.*known: run, ray, model"):
        load_config(write(tmp_path, "trian: {}\n"))
    with pytest.raises(ConfigError, match="unknown key 'source_file'"):
        load_config(write(tmp_path, "source_file: x.yaml\n"))


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "sample:\n  n: four\n")
    with pytest.raises(ConfigError, match=rf"^{p}: sample\.n: expected an integer, got 'four'$"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"train: expected a mapping"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"model\.base: expected a string"):
        load_config(write(tmp_path, "model:\n  base: 5\n"))
    with pytest.raises(ConfigError, match=r"train\.use_gpu: expected true or false"):
        load_config(write(tmp_path, "train:\n  use_gpu: 1\n"))


@pytest.mark.parametrize("key", ["sample.n", "run.seed", "train.batch_size", "eval.limit", "ray.num_cpus",
                                 "train.report_every", "train.zero_stage"])
def test_bool_is_not_an_int(tmp_path, key):
    p = write_key(tmp_path, key, True)
    with pytest.raises(ConfigError, match=rf"^{p}: {key}: expected .*got True$"):
        load_config(p)


@pytest.mark.parametrize("key", ["sample.n", "train.checkpoint_every", "eval.limit"])
def test_float_is_not_an_int(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"{key}: expected an integer, got 2.0"):
        load_config(write_key(tmp_path, key, 2.0))


def test_floats_accept_ints_and_yaml11_exponent_strings(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as the string "1e-5".
    p = write(tmp_path, "train:\n  lr: 1e-5\n  dpo_lr: 2e-7\n  epochs: 2\nsample:\n  top_p: 1\n")
    assert yaml.safe_load(p.read_text())["train"]["lr"] == "1e-5"
    cfg = load_config(p)
    assert cfg.train.lr == 1e-5 and cfg.train.dpo_lr == 2e-7
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.sample.top_p, float)
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got True"):
        load_config(write(tmp_path, "train:\n  lr: true\n"))
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs: expected a finite number"):
        load_config(write(tmp_path, "train:\n  epochs: .inf\n"))


def test_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.zero_stage: expected one of 0, 1, 2 or 3, got 5"):
        load_config(write(tmp_path, "train:\n  zero_stage: 5\n"))
    with pytest.raises(ConfigError, match=r"sample\.template: expected one of 'chat' or 'qwen-boxed'"):
        load_config(write(tmp_path, "sample:\n  template: raw\n"))
    with pytest.raises(ConfigError, match="train.objectives: unknown objective 'ppo'"):
        load_config(write(tmp_path, "train:\n  objectives: [dft, ppo]\n"))
    with pytest.raises(ConfigError, match="train.objectives: 'dft' is listed twice"):
        load_config(write(tmp_path, "train:\n  objectives: [dft, rft, dft]\n"))


# Every numeric key with a value just outside its range, and one at the edge that is allowed.
BAD_RANGES = [
    ("run.seed", -1, ">= 0"),
    ("ray.num_cpus", 0, ">= 1"),
    ("ray.max_parallel_stages", 0, ">= 1"),
    ("data.toy_count", 0, ">= 1"),
    ("sample.n", 0, ">= 1"),
    ("sample.temperature", -0.1, ">= 0"),
    ("sample.top_p", 0, "> 0"),
    ("sample.top_p", 1.01, "<= 1"),
    ("sample.max_tokens", 0, ">= 1"),
    ("sample.num_engines", 0, ">= 1"),
    ("sample.gpus_per_engine", -1, ">= 0"),
    ("sample.block_size", 0, ">= 1"),
    ("sample.gpu_memory_utilization", 0, "> 0"),
    ("sample.gpu_memory_utilization", 1.5, "<= 1"),
    ("sample.max_model_len", 0, ">= 1"),
    ("sample.kv_cache_gib", 0, "> 0"),
    ("verify.deadline_s", 0, "> 0"),
    ("verify.num_tasks", 0, ">= 1"),
    ("verify.max_positives_per_prompt", 0, ">= 1"),
    ("verify.max_pairs_per_prompt", 0, ">= 1"),
    ("train.lr", 0, "> 0"),
    ("train.dpo_lr", 0, "> 0"),
    ("train.batch_size", 0, ">= 1"),
    ("train.dpo_batch_size", 0, ">= 1"),
    ("train.micro_batch_tokens", 0, ">= 1"),
    ("train.epochs", 0, "> 0"),
    ("train.max_len", 1, ">= 2"),
    ("train.warmup_ratio", -0.1, ">= 0"),
    ("train.warmup_ratio", 1, "< 1"),
    ("train.weight_decay", -0.01, ">= 0"),
    ("train.grad_clip", 0, "> 0"),
    ("train.beta", 0, "> 0"),
    ("train.num_workers", 0, ">= 1"),
    ("train.cpus_per_worker", 0, ">= 1"),
    ("train.checkpoint_every", 0, ">= 1"),
    ("train.report_every", -1, ">= 0"),
    ("train.max_failures", -1, ">= 0"),
    ("train.logprob_chunk_tokens", 0, ">= 1"),
    ("eval.n", 0, ">= 1"),
    ("eval.temperature", -1, ">= 0"),
    ("eval.top_p", 0, "> 0"),
    ("eval.top_p", 2, "<= 1"),
    ("eval.max_tokens", 0, ">= 1"),
    ("eval.limit", 0, ">= 1"),
]
EDGE_VALUES = [
    ("run.seed", 0), ("sample.temperature", 0), ("sample.top_p", 1), ("sample.gpus_per_engine", 0),
    ("sample.gpu_memory_utilization", 1), ("train.warmup_ratio", 0), ("train.weight_decay", 0),
    ("train.max_len", 2), ("train.max_failures", 0), ("train.report_every", 0), ("eval.limit", 1),
    ("eval.temperature", 0), ("sample.max_model_len", None), ("sample.kv_cache_gib", None), ("train.dpo_lr", None), ("eval.limit", None),
]


@pytest.mark.parametrize("key,value,bound", BAD_RANGES, ids=[f"{k}={v}" for k, v, _ in BAD_RANGES])
def test_out_of_range_names_file_and_key(tmp_path, key, value, bound):
    p = write_key(tmp_path, key, value)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: {key}: must be {bound}, got {value!r}"


@pytest.mark.parametrize("key,value", EDGE_VALUES, ids=[f"{k}={v}" for k, v in EDGE_VALUES])
def test_range_edges_are_allowed(tmp_path, key, value):
    cfg = load_config(write_key(tmp_path, key, value))
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def _is_numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return False
    return any(_is_numeric(a) for a in typing.get_args(annotation))


def test_every_numeric_key_has_a_range_and_a_range_test():
    numeric = [f"{s}.{name}" for s in SECTIONS
               for name, f in type(getattr(Config(), s)).model_fields.items() if _is_numeric(f.annotation)]
    assert "train.lr" in numeric and "eval.limit" in numeric and "train.zero_stage" not in numeric
    tested = {k for k, _, _ in BAD_RANGES}
    assert sorted(set(numeric) - tested) == []
    for key in numeric:
        section, name = key.split(".")
        meta = type(getattr(Config(), section)).model_fields[name].metadata
        assert any(hasattr(m, attr) for m in meta for attr in ("ge", "gt")), key


def test_eval_limit_zero_is_an_error_not_all(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.limit: must be >= 1, got 0"):
        load_config(None, ["eval.limit=0"])
    assert load_config(None, ["eval.limit=null"]).eval.limit is None


def test_checkpoint_every_zero_is_an_error(tmp_path):
    p = write(tmp_path, "train:\n  checkpoint_every: 0\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train\.checkpoint_every: must be >= 1, got 0$"):
        load_config(p)


def test_dotted_overrides_are_typed_and_validated():
    cfg = load_config(None, ["train.lr=1e-5", "sample.n=8", "eval.benchmarks=[toy_id]"])
    assert cfg.train.lr == 1e-5 and cfg.sample.n == 8 and cfg.eval.benchmarks == ("toy_id",)
    with pytest.raises(ConfigError, match=r"\(override train.lr=fast\): train\.lr: expected a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    assert parse_override("train.lr=1e-5") == (["train", "lr"], "1e-5")  # made a float by the model
    cfg = load_config(None, ["data.source.name=x", "data.source.path=y.jsonl"])
    assert cfg.data.source == SourceSpec(name="x", path="y.jsonl")


@pytest.mark.parametrize("data,key", [
    ({"dft": "pairs"}, "train.data.dft"),
    ({"rft": "pairs"}, "train.data.rft"),
    ({"dpo": "positives"}, "train.data.dpo"),
    ({"dpo": "gold"}, "train.data.dpo"),
    ({"ppo": "positives"}, "train.data.ppo"),
    ({"dft": "samples"}, "train.data.dft"),
])
def test_unsupported_train_data_fails_at_load(tmp_path, data, key):
    p = write(tmp_path, yaml.safe_dump({"train": {"data": data}}))
    with pytest.raises(ConfigError, match=rf"^{p}: {key}: "):
        load_config(p)


def test_compile_under_zero3_fails_at_load(tmp_path):
    p = write(tmp_path, "train:\n  compile: true\n  zero_stage: 3\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train.compile: needs train.zero_stage 0, 1 or 2"):
        load_config(p)
    assert load_config(None, ["train.compile=true", "train.zero_stage=2"]).train.compile is True


def test_supported_train_data_loads(tmp_path):
    p = write(tmp_path, "train:\n  objectives: [sft, dft, dpo]\n"
                        "  data: {sft: gold, dft: positives, dpo: pairs, rft: gold}\n")
    assert load_config(p).train.data == {"sft": "gold", "dft": "positives", "dpo": "pairs", "rft": "gold"}


def test_eval_models_and_benchmarks_rules(tmp_path):
    ok = load_config(None, ["train.objectives=[rft, dft]", "eval.models=[base, dft]"])
    assert ok.eval.models == ("base", "dft")
    with pytest.raises(ConfigError, match=r"eval\.models: 'dpo' is neither 'base' nor a training run"):
        load_config(None, ["train.objectives=[rft, dft]", "eval.models=[base, dpo]"])
    with pytest.raises(ConfigError, match=r"eval\.benchmarks: must not be empty"):
        load_config(None, ["eval.benchmarks=[]"])
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.0: expected a string"):
        load_config(None, ["eval.benchmarks=[1]"])
    with pytest.raises(ConfigError, match=r"eval\.benchmarks: expected a list"):
        load_config(None, ["eval.benchmarks=toy_id"])


def test_messages_are_short_and_pydantic_free(tmp_path):
    p = write(tmp_path, "sample:\n  n: 0\n  top_p: 2\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    lines = msg.splitlines()
    assert all(line.startswith(f"{p}: ") for line in lines) and len(lines) == 3
    for bad in ("pydantic", "For further information", "validation error", "Input should", "type="):
        assert bad not in msg


def test_bad_data_source_is_caught_before_work(tmp_path):
    p = write(tmp_path, "data:\n  source: {name: s, path: x.jsonl, problem_feild: q}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.source\.problem_feild' \(known: name, path"):
        load_config(p)
    p = write(tmp_path, "data:\n  source: {path: x.jsonl}\n")
    with pytest.raises(ConfigError, match=rf"^{p}: missing required key 'data\.source\.name'$"):
        load_config(p)
    p = write(tmp_path, "data:\n  source: {name: s, path: x.jsonl, limit: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{p}: data\.source\.limit: must be >= 1, got 0$"):
        load_config(p)
    p = write(tmp_path, "data:\n  source: {name: s, path: x.jsonl, answer_field: null}\n")
    with pytest.raises(ConfigError, match=rf"^{p}: data\.source\.answer_field: required"):
        load_config(p)


def test_data_source_is_a_typed_spec(tmp_path):
    p = write(tmp_path, "data:\n  source: {name: s, path: x.jsonl, answer_from: boxed_solution}\n")
    cfg = load_config(p)
    assert isinstance(cfg.data.source, SourceSpec)
    assert cfg.data.source.answer_column == "solution"
    assert cfg.to_dict()["data"]["source"]["answer_from"] == "boxed_solution"


def test_configs_are_frozen_and_hashable():
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0
    with pytest.raises(ValidationError):
        cfg.train = cfg.train
    with pytest.raises(AttributeError):
        cfg.train.objectives.append("sft")  # a tuple
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1.0})})
    assert changed.train.lr == 1.0 and cfg.train.lr == 5e-4 and changed.source_file == cfg.source_file
    assert changed != cfg and hash(cfg) == hash(load_config())
    for s in SECTIONS:
        section = getattr(cfg, s)
        hash(section)
        assert isinstance(section.model_dump(mode="json"), dict)
    with_data = load_config(None, ["train.data={dft: gold}", "data.source={name: a, path: b.jsonl}"])
    hash(with_data.train), hash(with_data.data), hash(with_data)
    assert hash(with_data.data.source) == hash(SourceSpec(name="a", path="b.jsonl"))


def test_source_file_is_set_at_construction_and_not_dumped_or_compared():
    cfg = Config(source_file="somewhere.yaml", sample={"n": 2})
    assert cfg.source_file == "somewhere.yaml" and cfg.sample.n == 2
    assert Config().source_file == "<defaults>"
    assert "source_file" not in cfg.to_dict() and set(cfg.to_dict()) == set(SECTIONS)
    assert cfg == Config(sample={"n": 2}) and hash(cfg) == hash(Config(sample={"n": 2}))


def test_to_dict_round_trips_through_yaml():
    cfg = load_config(None, ["train.data={dft: gold}", "data.source={name: a, path: b.jsonl}", "eval.models=[base]"])
    d = cfg.to_dict()
    text = yaml.safe_dump(d, sort_keys=False)  # plain lists/dicts only
    again = config_from_dict(yaml.safe_load(text), "run/config.yaml")
    assert again == cfg and again.source_file == "run/config.yaml"
    assert d["train"]["objectives"] == list(cfg.train.objectives)
    with pytest.raises(ConfigError, match=r"^run/config\.yaml: sample\.n: must be >= 1"):
        config_from_dict({**d, "sample": {**d["sample"], "n": 0}}, "run/config.yaml")


def test_identity_dump_drops_the_declared_keys():
    cfg = load_config()
    assert identity_dump(cfg.ray, "ray") == {}
    verify = identity_dump(cfg.verify, "verify")
    assert "num_tasks" not in verify and verify["deadline_s"] == cfg.verify.deadline_s
    assert identity_dump(cfg.run, "run") == {"seed": cfg.run.seed}
    train = identity_dump(cfg.train, "train")
    for k in ("max_failures", "checkpoint_every", "report_every", "logprob_chunk_tokens"):
        assert k not in train
    assert train["lr"] == cfg.train.lr and train["objectives"] == list(cfg.train.objectives)
    sample = identity_dump(cfg.sample, "sample")
    assert "num_engines" not in sample and "gpu_memory_utilization" not in sample and sample["n"] == 4
    assert "registry" not in identity_dump(cfg.eval, "eval")
    assert identity_dump(cfg.model, "model") == cfg.model.model_dump(mode="json")
    whole = identity_dump(cfg, "")
    assert "ray" not in whole and "num_tasks" not in whole["verify"] and "dir" not in whole["run"]


def test_identity_dump_ignores_exactly_the_no_output_effect_keys():
    cfg = load_config(None, ["data.source={name: a, path: b.jsonl}"])
    keys = leaf_keys(cfg)
    for entry in NO_OUTPUT_EFFECT:  # each names a real key or section
        assert entry in keys or any(k.startswith(entry + ".") for k in keys), entry
    for key in keys:
        section, *path = key.split(".")
        node = identity_dump(getattr(cfg, section), section)
        for part in path:
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        ignored = any(key == e or key.startswith(e + ".") for e in NO_OUTPUT_EFFECT)
        assert (node is KeyError) == ignored, key


def test_leaf_keys_cover_every_field():
    cfg = Config()
    keys = leaf_keys(cfg)
    expected = [f"{s}.{name}" for s in SECTIONS for name in type(getattr(cfg, s)).model_fields]
    assert keys == expected
    assert "train.gradient_checkpointing" in keys and "train.report_every" in keys
    assert "data.source" in keys and "train.data" in keys
    with_source = load_config(None, ["data.source={name: a, path: b.jsonl}", "train.data={dft: gold}"])
    keys = leaf_keys(with_source)
    assert "data.source" not in keys and "train.data" in keys
    assert [k for k in keys if k.startswith("data.source.")] == [
        f"data.source.{f}" for f in SourceSpec.field_names()]
    for key in keys:  # every leaf resolves to a plain value
        obj = with_source
        for part in key.split("."):
            obj = getattr(obj, part)
        assert not isinstance(obj, BaseModel), key


def test_objectives_constant_is_unchanged():
    assert OBJECTIVES == ("sft", "rft", "dft", "dpo", "chi2", "hellinger", "tv")


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name != "benchmarks.yaml")
    assert "toy.yaml" in names
    for name in names:
        load_config(CONFIG_DIR / name)


def test_cli_fails_before_work_on_bad_config_or_stage(tmp_path, capsys):
    from pipeline.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", "train.lr=abc", f"run.dir={run_dir}"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err
    assert main(["run", "--force", "trian", f"run.dir={run_dir}"]) == 2
    assert "no stage named 'trian'" in capsys.readouterr().err
    assert not run_dir.exists(), "nothing may be written before the config is valid"


@pytest.mark.parametrize("override, key", [
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.beta=0", "train.beta"),
    ("train.epochs=0", "train.epochs"), ("train.micro_batch_tokens=0", "train.micro_batch_tokens"),
    ("eval.limit=0", "eval.limit"), ("data.source={name: x, path: /nonexistent/prompts.jsonl}", "data.source"),
    ("model.base=/nonexistent/model-dir", "model.base"), ("train.data={dpo: gold}", "train.data.dpo"),
])
def test_bad_values_fail_in_one_line_before_ray_starts(override, key, tmp_path, monkeypatch):
    """A user error is one line on stderr naming the file and the key, exit 2, no
    traceback, nothing written, and Ray never started (the CLI runs in this process)."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", override, f"run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "toy.yaml" in err[0], err
    assert "Traceback" not in proc.stderr and "started a local Ray" not in proc.stdout
    assert not run_dir.exists()
    debug = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--debug", override, f"run.dir={run_dir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
