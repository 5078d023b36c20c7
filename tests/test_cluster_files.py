"""The files in cluster/ are only exercised on a real cluster, so check here what can be
checked without one: their shape (with Ray's own validators where Ray has them), that
the commands they contain name files that exist, and that the real `ray` CLI accepts
the flags the README tells people to type."""

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "gpu-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
README = CLUSTER / "README.md"

# GPUs per instance for the types we use; a wrong count makes the autoscaler launch
# nodes that cannot host the request, or never launch them.
AWS_GPUS = {
    "g5.xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.12xlarge": 4,
    "g6e.12xlarge": 4, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}

CONFIG_PATH = re.compile(r"configs/[\w.\-]+\.yaml")


def load(path):
    return yaml.safe_load(path.read_text())


def gpu_worker_types(launcher):
    return {
        name: spec
        for name, spec in launcher["available_node_types"].items()
        if name != launcher["head_node_type"] and spec.get("resources", {}).get("GPU", 0) > 0
    }


# ---- cluster launcher -----------------------------------------------------------------


def test_launcher_has_required_fields():
    cfg = load(LAUNCHER)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for name, spec in cfg["available_node_types"].items():
        assert {"resources", "node_config"} <= spec.keys(), name
        if name != cfg["head_node_type"]:
            assert {"min_workers", "max_workers"} <= spec.keys(), name


def test_launcher_passes_rays_own_validation():
    # The same steps `ray up` runs before launching anything: merge the provider
    # defaults, then check against Ray's JSON schema (unknown keys are errors there).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


def test_launcher_validation_would_catch_a_typo():
    # Guards the test above: it must not pass whatever the file says.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(LAUNCHER)
    worker = next(iter(gpu_worker_types(cfg)))
    bad = copy.deepcopy(cfg)
    bad["available_node_types"][worker]["min_worker"] = 1  # missing "s"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_has_a_gpu_worker_type_that_requests_gpus():
    cfg = load(LAUNCHER)
    workers = gpu_worker_types(cfg)
    assert workers, "no worker type advertises GPUs"
    assert all(spec["max_workers"] >= 1 for spec in workers.values())
    # Every GPU instance type must advertise exactly the GPUs it has.
    for name, spec in cfg["available_node_types"].items():
        instance = spec["node_config"]["InstanceType"]
        if instance in AWS_GPUS and name != cfg["head_node_type"]:
            assert spec.get("resources", {}).get("GPU") == AWS_GPUS[instance], (name, instance)


def test_launcher_installs_the_project_with_the_gpu_extra():
    cfg = load(LAUNCHER)
    setup = " && ".join(cfg["setup_commands"])
    assert re.search(r"pip install (-e )?'\.\[gpu\]'", setup), setup
    # The directory the command cd's into is the one file_mounts fills with the checkout.
    cd_dir = re.search(r"cd (\S+)", setup).group(1)
    assert cfg["file_mounts"].get(cd_dir) == ".", cfg["file_mounts"]


def test_launcher_keeps_the_venv_and_runs_off_the_nodes():
    excluded = {p.strip("/") for p in load(LAUNCHER)["rsync_exclude"]}
    assert {".venv", "runs"} <= excluded


def test_launcher_start_commands():
    cfg = load(LAUNCHER)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head  # `ray job submit` talks to the dashboard
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


# ---- runtime_env ------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    RuntimeEnv(**env)  # raises on unknown pip fields, wrong types, ...
    assert env["working_dir"] == "."
    assert env["env_vars"]["HF_HOME"]


def test_runtime_env_installs_the_project_with_the_gpu_extra():
    pip = load(RUNTIME_ENV)["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    # The uploaded working dir, installed with its gpu extra: dependencies come from
    # pyproject.toml, so this list cannot drift from it.
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]" in packages
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^gpu = \[", pyproject, re.M), "pyproject.toml has no gpu extra"


def _ray_upload(root, excludes, out):
    """Zip `root` exactly as Ray packs a working_dir; .gitignore deliberately ignored, so
    the excludes must hold on their own (a checkout may lack or change .gitignore)."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(root), excludes, str(out), include_gitignore=False)
    return set(zipfile.ZipFile(out).namelist())


def test_runtime_env_excludes_keep_venv_runs_and_git_out_of_the_upload(tmp_path):
    root = tmp_path / "checkout"
    for rel in (".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/toy/manifest.json",
                ".git/HEAD", "pipeline/__pycache__/cli.cpython-311.pyc",
                "pipeline/cli.py", "configs/toy.yaml", "pyproject.toml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    names = _ray_upload(root, load(RUNTIME_ENV)["excludes"], tmp_path / "pkg.zip")
    assert {"pipeline/cli.py", "configs/toy.yaml", "pyproject.toml"} <= names
    leaked = [n for n in names if n.split("/")[0] in {".venv", "runs", ".git"} or "__pycache__" in n]
    assert not leaked, leaked


def test_repo_upload_stays_under_rays_package_limit():
    # Sum what Ray would upload from this checkout, pruning excluded directories the way
    # Ray's packer does (without zipping gigabytes by accident if an exclude is lost).
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _get_excludes

    excluded = _get_excludes(REPO, load(RUNTIME_ENV)["excludes"])
    total = 0
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if not excluded(Path(dirpath) / d)]
        for f in filenames:
            p = Path(dirpath) / f
            if not excluded(p) and p.is_file():
                total += p.stat().st_size
    assert total < GCS_STORAGE_MAX_SIZE / 4, f"{total / 2**20:.0f} MiB would be uploaded"


# ---- KubeRay RayJob ------------------------------------------------------------------------


def test_rayjob_shape():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"]


def test_rayjob_entrypoint_runs_a_config_on_shared_storage():
    entry = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert entry[:2] == ["verifine", "run"]
    assert (REPO / entry[2]).is_file(), f"{entry[2]} does not exist in the repo"
    run_dir = [a.split("=", 1)[1] for a in entry[3:] if a.startswith("run.dir=")]
    assert run_dir and re.match(r"(s3|gs)://", run_dir[0]), entry


def test_rayjob_runtime_env_matches_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    inline = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**inline)
    shared = load(RUNTIME_ENV)
    assert inline["pip"] == shared["pip"]
    assert inline["env_vars"] == shared["env_vars"]
    # The submitter pod has no checkout: the code must come from a remote archive.
    assert re.match(r"(https|s3|gs)://.+\.zip$", inline["working_dir"]), inline["working_dir"]


def _containers(group):
    return group["template"]["spec"]["containers"]


def test_rayjob_gpu_workers_request_gpus():
    cluster = load(RAYJOB)["spec"]["rayClusterSpec"]
    for group in cluster["workerGroupSpecs"]:
        limits = _containers(group)[0]["resources"]["limits"]
        # Kubernetes schedules extended resources by their limit.
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_uses_one_ray_version_everywhere():
    # Head and workers on different Ray versions fail to form a cluster.
    cluster = load(RAYJOB)["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in _containers(g)}
    assert len(images) == 1, images
    tag = images.pop().split(":")[1]
    assert tag.startswith(cluster["rayVersion"] + "-"), (tag, cluster["rayVersion"])


# ---- config paths named anywhere in cluster/ -------------------------------------------------


@pytest.mark.parametrize("path", [LAUNCHER, RAYJOB, README], ids=lambda p: p.name)
def test_named_config_files_exist(path):
    named = set(CONFIG_PATH.findall(path.read_text()))
    assert "configs/qwen2.5-math-1.5b.yaml" in named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"{path.name} names configs that do not exist: {missing}"


# ---- README commands against the real Ray CLI -----------------------------------------------


@functools.lru_cache(maxsize=None)
def ray_help(*subcommand):
    ray = Path(sys.executable).parent / "ray"  # the venv's CLI, not whatever is on PATH
    out = subprocess.run([str(ray), *subcommand, "--help"], capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout


def readme_commands(prefix):
    """Command lines in the README's code blocks that start with `prefix`."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def flags_before_entrypoint(line):
    """--flags of a `ray ...` command line, up to the ` -- ` that starts the entrypoint."""
    words = shlex.split(line, comments=True)
    if "--" in words:
        words = words[: words.index("--")]
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def test_readme_submit_commands_use_flags_ray_job_submit_accepts():
    lines = readme_commands("ray job submit")
    assert lines
    help_text = ray_help("job", "submit")
    used = set()
    for line in lines:
        for flag in flags_before_entrypoint(line):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text), (flag, line)
            used.add(flag)
    assert {"--address", "--working-dir", "--runtime-env", "--submission-id", "--no-wait"} <= used


@pytest.mark.parametrize("sub", ["logs", "stop", "list", "status"])
def test_readme_job_commands_use_flags_ray_accepts(sub):
    lines = readme_commands(f"ray job {sub}")
    assert lines, f"README shows no `ray job {sub}`"
    help_text = ray_help("job", sub)
    for line in lines:
        for flag in flags_before_entrypoint(line):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text), (flag, line)
    if sub == "logs":
        assert any("--follow" in line for line in lines)


def test_readme_submit_commands_point_at_files_that_exist():
    for line in readme_commands("ray job submit"):
        words = shlex.split(line)
        if "--runtime-env" in words:
            assert (REPO / words[words.index("--runtime-env") + 1]).is_file(), line
        entry = words[words.index("--") + 1:]
        assert entry[:2] == ["verifine", "run"], line
    for line in readme_commands("ray up") + readme_commands("ray dashboard"):
        assert (REPO / shlex.split(line, comments=True)[2]).is_file(), line


def test_readme_shows_the_canonical_cluster_submit():
    canonical = ("ray job submit --address http://HEAD:8265 --working-dir . --runtime-env "
                 "cluster/runtime_env.yaml -- verifine run configs/qwen2.5-math-1.5b.yaml "
                 "run.dir=s3://bucket/runs/x train.lr=1e-5")
    assert canonical in readme_commands("ray job submit")
    text = README.read_text()
    for piece in ("--stages eval", "--force train", "verifine status", "verifine report",
                  "ray start --head", "RAY_ADDRESS"):
        assert piece in text, piece
