import pytest

from pipeline.config import CONFIG_DIR, ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_is_the_toy_config():
    cfg = load_config()
    assert cfg.model.base == "toy" and cfg.source_file.endswith("toy.yaml")


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "lrr" in str(e.value) and str(p) in str(e.value) and "train" in str(e.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "sample:\n  n: four\n")
    with pytest.raises(ConfigError, match=r"sample\.n: expected an integer"):
        load_config(p)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.n"):
        load_config(write(tmp_path, "sample:\n  n: true\n"))


def test_bad_choice_and_bad_range(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(write(tmp_path, "train:\n  zero_stage: 5\n"))
    with pytest.raises(ConfigError, match=r"sample\.top_p"):
        load_config(write(tmp_path, "sample:\n  top_p: 1.5\n"))
    with pytest.raises(ConfigError, match="unknown objective 'ppo'"):
        load_config(write(tmp_path, "train:\n  objectives: [dft, ppo]\n"))


def test_dotted_overrides_are_typed_and_validated():
    cfg = load_config(None, ["train.lr=1e-5", "sample.n=8", "eval.benchmarks=[toy_id]"])
    assert cfg.train.lr == 1e-5 and cfg.sample.n == 8 and cfg.eval.benchmarks == ["toy_id"]
    with pytest.raises(ConfigError, match=r"overrides train.lr=fast.*train\.lr: expected a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_bad_data_source_is_caught_before_work(tmp_path):
    p = write(tmp_path, "data:\n  source: {path: x.jsonl, problem_feild: q}\n")
    with pytest.raises(ConfigError, match="problem_feild"):
        load_config(p)


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
