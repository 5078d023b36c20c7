"""Training: real DeepSpeed (gloo on CPU), real Ray Train workers, the toy model."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actors.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def write_positives(store: RunStore, tokenizer_dir: str, count: int = 24) -> str:
    from transformers import AutoTokenizer

    from actors.prompt_templates import render_prompt
    from pipeline.toy_task import make_problems, solution_text

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for i, p in enumerate(make_problems("train", count, seed=3)):
        a, b = (int(x) for x in p["problem"][8:-1].split(" + "))
        # vary lengths so micro-batches differ in size and padding
        # as the sampler stores a finished sample: ending with the stop token it generated
        completion = solution_text(a, b) + (" Done." * (i % 3)) + tok.eos_token
        rows.append({"prompt_id": f"p{i:03d}", "sample_idx": 0, "prompt": render_prompt(tok, "chat", p["problem"]),
                     "completion": completion})
    store.write_rows("data/positives.parquet", rows)
    return "data/positives.parquet"


def loop_cfg(store, model, data_file, export, **kw):
    cfg = {"objective": "sft", "data": "positives", "data_file": data_file, "reference_file": None,
           "store_uri": store.uri, "model_path": model, "export_dir": export, "metrics_file": f"{export}.jsonl",
           "template": "chat", "seed": 0, "lr": 0.5, "batch_size": 8, "micro_batch_tokens": 256, "epochs": 1.0,
           "max_len": 256, "warmup_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "beta": 0.1,
           "zero_stage": 2, "precision": "fp32", "optimizer": "sgd", "checkpoint_every": 100, "use_gpu": False,
           "logprob_chunk_tokens": 64}
    cfg.update(kw)
    return cfg


def train_in_one_process(cfg: dict, tmp_path: Path) -> None:
    """`train_loop` alone in a fresh process (world size 1, no Ray)."""
    cfg_file = tmp_path / f"{cfg['export_dir']}.json"
    cfg_file.write_text(json.dumps(cfg))
    code = "import json, sys; from actors.train_loop import train_loop; train_loop(json.load(open(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(cfg_file)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_a_training_larger_than_the_local_ray_fails_naming_its_keys(ray_local, tmp_path, monkeypatch):
    """A local Ray never grows, so a training that needs more CPUs than it has would wait
    for its placement group forever; it fails at once, naming the keys to change (fit is
    never called: a stand-in that fails the test if it were, rather than hang)."""
    from ray.train.torch import TorchTrainer

    from pipeline import ray_session
    from pipeline.config import ConfigError
    from pipeline.train_stage import run_with_ray_train

    assert ray_session.is_local() and ray_local.cluster_resources()["CPU"] == 2
    monkeypatch.setattr(TorchTrainer, "fit", lambda self: pytest.fail("fit() was called"))
    with pytest.raises(ConfigError, match=r"^train\.num_workers=2 x train\.cpus_per_worker=2 needs 4 CPU, "
                                          r"but this local Ray has 2 CPU"):
        run_with_ray_train({}, 2, False, str(tmp_path / "ray"), 0, cpus_per_worker=2)
    assert not (tmp_path / "ray").exists()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_two_workers_two_microbatches_equal_one_process_full_batch(toy_model, ray_local, tmp_path, zero_stage):
    """One SGD step (update = -lr * grad, so any normalisation error shows): 2 Ray Train
    workers, each with 2 micro-batches, vs a single process on the whole batch. ZeRO-0
    (the toy configs') all-reduces once, in step(); ZeRO-2 reduces at every backward. Under
    ZeRO-3 every parameter is partitioned (persistence threshold 0), the tied LM head
    included, and the exported model is gathered from both ranks."""
    from pipeline.train_stage import run_with_ray_train

    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=8)  # batch_size 8, 1 epoch: exactly one step
    single = loop_cfg(store, toy_model, data, "single", micro_batch_tokens=100000)
    train_in_one_process(single, tmp_path)
    # token budget 256: each worker's 4 sequences (~70-90 tokens) need 2 micro-batches
    dist_cfg = loop_cfg(store, toy_model, data, "dist", zero_stage=zero_stage, zero3_param_persistence_threshold=0)
    run_with_ray_train(dist_cfg, 2, False, str(tmp_path / "ray"), 0)
    metrics = [json.loads(l) for l in (tmp_path / "dist.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["micro_batches_max"] >= 2, metrics
    assert (metrics[0]["workers"], metrics[0]["torch_threads"]) == (2, 1), "a 1-CPU worker runs one torch thread"
    base, a, b = load_weights(toy_model), load_weights(tmp_path / "single"), load_weights(tmp_path / "dist")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "the step did not change the weights"
    for k in a:
        torch.testing.assert_close(b[k] - base[k], a[k] - base[k], rtol=1e-3, atol=1e-5 * max(1.0, moved))
    # ...and both equal a plain PyTorch SGD step on -sum(log p)/N, computed right here.
    expected = plain_sgd_step(toy_model, store.read_rows(data), lr=single["lr"])
    for k in a:
        torch.testing.assert_close(a[k] - base[k], expected[k] - base[k], rtol=1e-3, atol=1e-5 * max(1.0, moved))


def plain_sgd_step(model_dir, rows, lr):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, n_tokens = 0.0, 0
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]  # ends with its EOS already
        assert c[-1] == tok.eos_token_id
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        total = total - logp[len(p) - 1:].sum()
        n_tokens += len(c)
    (total / n_tokens).backward()
    with torch.no_grad():
        for prm in model.parameters():
            prm -= lr * prm.grad
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_killed_worker_resumes_from_last_checkpoint(toy_model, ray_local, tmp_path, monkeypatch, zero_stage):
    """Under ZeRO-0 only rank 0 writes the checkpoint (weights + optimizer state), so the
    restarted rank 1 must restore from rank 0's files; under ZeRO-2 each rank its shard."""
    from pipeline.train_stage import run_with_ray_train

    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=40)
    marker = tmp_path / "killed.pid"
    cfg = loop_cfg(store, toy_model, data, "model", optimizer="adamw", lr=1e-3, epochs=1.0, checkpoint_every=2,
                   kill_worker_at={"step": 3, "rank": 1, "marker": str(marker)}, zero_stage=zero_stage)
    run_with_ray_train(cfg, 2, False, str(tmp_path / "ray"), 2)
    assert marker.exists(), "the worker was never killed"
    metrics = [json.loads(l) for l in (tmp_path / "model.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 6))  # 40 rows / batch 8, each step once
    assert all(m["resumed_from_step"] == 0 for m in metrics[:2])
    assert all(m["resumed_from_step"] == 2 for m in metrics[2:]), "did not restart from the step-2 checkpoint"
    # Both ranks really restored weights and AdamW state: the result is an uninterrupted
    # run's (up to reduction order, which Adam amplifies on a few near-zero-gradient weights).
    plain = {k: v for k, v in cfg.items() if k != "kill_worker_at"}
    train_in_one_process({**plain, "export_dir": "uninterrupted", "metrics_file": "uninterrupted.jsonl"}, tmp_path)
    base, resumed, whole = (load_weights(p) for p in (toy_model, tmp_path / "model", tmp_path / "uninterrupted"))
    moved = max((whole[k] - base[k]).abs().max().item() for k in whole)
    for k in whole:
        torch.testing.assert_close(resumed[k] - base[k], whole[k] - base[k], rtol=1e-2, atol=2e-2 * moved)


@pytest.mark.slow
@pytest.mark.parametrize("report_every,expected", [(0, [5, 10, 12]), (4, [4, 5, 8, 10, 12])])
def test_ray_train_report_only_at_checkpoints_or_report_every(toy_model, ray_local, tmp_path, monkeypatch,
                                                                report_every, expected):
    """Every `ray.train.report` waits until Ray Train's controller has taken the previous
    one (it polls every couple of seconds), so the loop reports at checkpoints and every
    `report_every` steps only, never per step. Counted where Ray Train receives them (a
    controller callback added to the pipeline's own TorchTrainer run), while the metrics
    file in the run store still gets one line per step."""
    import ray.train
    import ray.train.torch

    from pipeline.train_stage import run_with_ray_train

    class CountReports(ray.train.UserCallback):  # defined here: shipped by value to the controller
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps({"steps": [m.get("step") for m in metrics],
                                    "checkpoint": checkpoint is not None}) + "\n")

    reports_log = tmp_path / "reports.jsonl"
    real_trainer = ray.train.torch.TorchTrainer

    def trainer_counting_reports(*args, run_config, **kw):
        run_config.callbacks = [*(run_config.callbacks or []), CountReports(str(reports_log))]
        return real_trainer(*args, run_config=run_config, **kw)

    # (not ray.train.RunConfig: its instances must stay picklable by reference)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer_counting_reports)
    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=24)  # batch 2, 1 epoch: 12 steps
    cfg = loop_cfg(store, toy_model, data, "model", batch_size=2, checkpoint_every=5, report_every=report_every,
                   metrics_write_interval_s=0.5)
    run_with_ray_train(cfg, 2, False, str(tmp_path / "ray"), 0)
    reports = [json.loads(l) for l in reports_log.read_text().splitlines()]
    assert [r["steps"] for r in reports] == [[s, s] for s in expected], reports  # both workers, same steps
    assert [r["checkpoint"] for r in reports] == [s % 5 == 0 or s == 12 for s in expected], reports
    metrics = [json.loads(l) for l in (tmp_path / "model.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(m["tokens"] > 0 and m["elapsed_s"] > 0 for m in metrics)
    # wall-clock step ends: increasing, and the same clock as elapsed_s (one loop start for all)
    assert all(a["time"] < b["time"] for a, b in zip(metrics, metrics[1:]))
    starts = [m["time"] - m["elapsed_s"] for m in metrics]
    assert max(starts) - min(starts) < 0.01 and abs(starts[0] - time.time()) < 600, starts


def test_cpu_engine_builds_no_inference_comm_kernel(tmp_path):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory inference all-reduce
    into TORCH_EXTENSIONS_DIR at init; the training engine neither builds nor loads it.
    In a fresh process, so DeepSpeed's comm backend is created here and not reused."""
    code = """if True:
        import torch, deepspeed.comm.comm as ds_comm
        from actors.train_loop import _init_distributed, build_engine
        _init_distributed(on_gpu=False)
        cfg = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "grad_clip": 1.0,
               "zero_stage": 0, "precision": "fp32", "use_gpu": False}
        engine, _ = build_engine(cfg, torch.nn.Linear(4, 4), total_steps=2)
        print("shm op loaded:", ds_comm.cdb.shm_comm_op is not None)
    """
    ext_dir = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shm op loaded: False" in out.stdout
    assert not ext_dir.exists() or not any(ext_dir.rglob("*.so")), "a C++ extension was built"


def _saved_bytes_and_grads(model, ids):
    """Bytes autograd saves for backward in one forward of the loop's module, and the
    parameters' gradients of its summed log-probs."""
    from actors.token_logprobs import TokenLogprobModel

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = TokenLogprobModel(model, chunk_tokens=64)(ids)
    logp.sum().backward()
    return saved, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_the_loop_trains_in_train_mode_so_gradient_checkpointing_recomputes(toy_model):
    """HF loads a model in eval mode, where gradient checkpointing silently does nothing
    (the paper configs' memory estimates count on it): the loop's model is in training
    mode, keeps under half the activations with checkpointing, and gets the same gradients."""
    from actors.train_loop import load_model_for_training

    plain = load_model_for_training({}, toy_model)
    ckpt = load_model_for_training({"gradient_checkpointing": True}, toy_model)
    assert plain.training and ckpt.training and not plain.config.use_cache
    ids = torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(0))
    (full, plain_grads), (kept, ckpt_grads) = _saved_bytes_and_grads(plain, ids), _saved_bytes_and_grads(ckpt, ids)
    assert kept < 0.5 * full, (kept, full)
    for k, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[k], g, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_gradients_under_the_same_names(toy_model):
    """train.compile compiles each decoder layer in place: the same gradients as eager up
    to float rounding, and the same state-dict names (checkpoints, export)."""
    from actors.train_loop import load_model_for_training

    eager, compiled = load_model_for_training({}, toy_model), load_model_for_training({"compile": True}, toy_model)
    layers = compiled.get_decoder().layers
    assert len(layers) >= 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for shape in ((4, 48), (3, 61)):  # another batch and length: the same compiled layers
        ids = torch.randint(3, 200, shape, generator=torch.Generator().manual_seed(1))
        (_, want), (_, got) = _saved_bytes_and_grads(eager, ids), _saved_bytes_and_grads(compiled, ids)
        for k, g in want.items():  # fused kernels round differently: tolerance on the gradient's own scale
            torch.testing.assert_close(got[k], g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
        eager.zero_grad(), compiled.zero_grad()


def test_metrics_log_writes_in_background_and_on_demand(tmp_path):
    """Rank 0's metrics file follows the history from a background thread (the step never
    waits on the store), is brought up to date synchronously on write()/close(), and is
    never written by other ranks."""
    import time

    from actors.train_loop import MetricsLog

    store = RunStore(str(tmp_path))
    cfg = {"store_uri": store.uri, "metrics_file": "train/metrics.jsonl", "metrics_write_interval_s": 0.05}
    path = tmp_path / "train" / "metrics.jsonl"
    history = [{"step": 1}]  # as restored from a checkpoint
    log = MetricsLog(cfg, history, enabled=True)
    log.append({"step": 2})
    deadline = time.time() + 30
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) == 2):
        time.sleep(0.02)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    log._stop.set()  # no more background writes: what follows must be synchronous
    log._thread.join()
    log.append({"step": 3})
    log.write()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
    log.append({"step": 4})
    log.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert not [f for f in path.parent.iterdir() if f.name != "metrics.jsonl"], "a temporary file was left"
    other = MetricsLog({**cfg, "metrics_file": "train/other.jsonl"}, [{"step": 1}], enabled=False)
    other.close()
    assert not (tmp_path / "train" / "other.jsonl").exists()


def test_empty_training_set_is_refused_with_reason(tmp_path):
    from pipeline.train_stage import check_not_empty

    store = RunStore(str(tmp_path))
    store.write_rows("verify/pairs.parquet", [])
    stats = {"verdicts": {"correct": 0, "incorrect": 8}, "pass_at_1": 0.0, "prompts_all_correct": 0.0,
             "prompts_all_wrong": 1.0}
    with pytest.raises(ValueError) as e:
        check_not_empty(store, "verify/pairs.parquet", "pairs", stats)
    msg = str(e.value)
    assert "pairs set" in msg and "verify/pairs.parquet" in msg and "all-wrong 1.00" in msg


def test_reference_that_does_not_match_rows_is_refused(toy_model, tmp_path):
    from transformers import AutoTokenizer

    from actors.train_loop import load_units

    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=4)
    rows = store.read_rows(data)
    store.write_rows("ref.parquet", [{"prompt_id": r["prompt_id"], "sample_idx": 0, "ref_completion": [-1.0, -2.0]}
                                     for r in rows])
    cfg = loop_cfg(store, toy_model, data, "x", reference_file="ref.parquet")
    with pytest.raises(ValueError, match="ref.parquet: 2 log-probs for a response of"):
        load_units(cfg, AutoTokenizer.from_pretrained(toy_model))
    store.write_rows("ref.parquet", [{"prompt_id": "other", "sample_idx": 0, "ref_completion": [-1.0]}])
    with pytest.raises(ValueError, match="does not match the training rows"):
        load_units(cfg, AutoTokenizer.from_pretrained(toy_model))


def _registered_checkpoint(snapshot) -> bool:
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_rerun_after_driver_death_resumes(toy_model, ray_local, tmp_path):
    """Kill the driver (and with it the training job) after a checkpoint; the next run of
    the same stage (same storage path) continues from that checkpoint. Under ZeRO-3 with
    every parameter partitioned, so its sharded checkpoint and gathered export are used."""
    import signal
    import time

    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=48)
    cfg = loop_cfg(store, toy_model, data, "model", optimizer="adamw", lr=1e-3, epochs=1.0, checkpoint_every=2,
                   step_sleep_s=1.0, zero_stage=3, zero3_param_persistence_threshold=0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    code = ("import json, sys, ray; ray.init(address='auto'); from pipeline.train_stage import run_with_ray_train; "
            "run_with_ray_train(json.load(open(sys.argv[1])), 2, False, sys.argv[2], 0)")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = [sys.executable, "-c", code, str(tmp_path / "cfg.json"), str(tmp_path / "ray")]
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A checkpoint is durable once Ray Train's controller has registered it in its snapshot;
    # the files alone can be on disk before that, and a kill then rightly starts over.
    snapshot = tmp_path / "ray" / "ray-train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and not _registered_checkpoint(snapshot):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model" / "model.safetensors").exists(), "training finished before the driver was killed"
    # the run store showed progress while it ran: at least the steps of the registered checkpoint
    partial = [json.loads(l)["step"] for l in (tmp_path / "model.jsonl").read_text().splitlines()]
    assert len(partial) >= 2 and partial == list(range(1, len(partial) + 1)), partial
    cfg["step_sleep_s"] = 0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(l) for l in (tmp_path / "model.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert metrics[-1]["resumed_from_step"] >= 2, "the rerun started over instead of resuming"
    base, trained = load_weights(toy_model), load_weights(tmp_path / "model")  # gathered from both ranks
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    assert all((trained[k] != base[k]).any() for k in base), "some exported weights never trained"


@pytest.mark.slow
def test_nan_loss_stops_with_clear_message_and_checkpoint_intact(toy_model, tmp_path):
    store = RunStore(str(tmp_path))
    data = write_positives(store, toy_model, count=32)
    ckpt = tmp_path / "ckpt"
    cfg = loop_cfg(store, toy_model, data, "model", lr=float("nan"), checkpoint_every=1, local_checkpoint_dir=str(ckpt))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    code = "import json, sys; from actors.train_loop import train_loop; train_loop(json.load(open(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "FloatingPointError: sft: loss is" in out.stderr and "last good checkpoint intact" in out.stderr
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] >= 1 and all(m["loss"] == m["loss"] for m in state["history"])  # no NaN saved
    assert not (tmp_path / "model").exists()
