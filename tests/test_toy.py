import pytest

from pipeline import toy_task


def test_toy_splits_are_disjoint_and_deterministic():
    train = toy_task.make_problems("train", 512, seed=0)
    held = toy_task.make_problems("id", 200, seed=0)
    harder = toy_task.make_problems("harder", 200, seed=0)
    assert train == toy_task.make_problems("train", 512, seed=0)
    assert not {p["problem"] for p in train} & {p["problem"] for p in held}
    assert len({p["problem"] for p in train}) == 512
    assert all(len(p["gold"]) >= 3 or int(p["gold"]) >= 100 for p in harder)
    for p in train[:50]:
        a, b = (int(x) for x in p["problem"][8:-1].split(" + "))
        assert p["gold"] == str(a + b) and toy_task.solution_text(a, b).endswith(f"\\boxed{{{a + b}}}")


def test_toy_split_capacity_is_checked():
    with pytest.raises(ValueError, match="room for"):
        toy_task.make_problems("id", 5000, seed=0)


@pytest.mark.slow
def test_toy_model_build_is_deterministic(tmp_path):
    from pipeline.toy_model import build_toy_model

    a = build_toy_model(tmp_path / "a", seed=7, log=lambda *_: None, max_steps=20)
    b = build_toy_model(tmp_path / "b", seed=7, log=lambda *_: None, max_steps=20)
    assert a["steps"] == b["steps"] == 20
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    c = build_toy_model(tmp_path / "c", seed=8, log=lambda *_: None, max_steps=20)
    assert (tmp_path / "c/model.safetensors").read_bytes() != (tmp_path / "a/model.safetensors").read_bytes()


def test_toy_model_loads_in_transformers(toy_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model)
    model = AutoModelForCausalLM.from_pretrained(toy_model)
    assert model.config.model_type == "qwen2" and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)


def test_stages_that_start_together_build_the_base_model_once(tmp_path, monkeypatch):
    """Stages run in driver threads; on a cold cache the first ones (sample, eval/base)
    ask for the toy model at the same moment. One builds it, the others wait: two
    concurrent builds raced in transformers' lazy imports and failed a cold default run."""
    import threading
    import time

    from actors.store import RunStore
    from pipeline import external, toy_model

    built = tmp_path / "toy-model-x"
    active, peak, calls = [0], [0], []
    guard = threading.Lock()

    def slow_build(seed, log=print):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(seed)
        time.sleep(0.3)
        if not built.exists():
            built.mkdir()
            (built / "config.json").write_text("{}")
        with guard:
            active[0] -= 1
        return built

    monkeypatch.setattr(toy_model, "ensure_toy_model", slow_build)
    store = RunStore(str(tmp_path / "run"))
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, external.base_model_source({"location": {"toy_seed": 0}}, store, log=lambda *_: None))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 3 and peak[0] == 1, "base model builds overlapped"
    assert results[0] == results[1] == results[2] and list(results[0]["files"]) == ["models/toy/toy-model-x/config.json"]
