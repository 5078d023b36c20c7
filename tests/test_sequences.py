"""Stop tokens and training sequences with real tokenizers: SmolLM2's (ChatML, EOS =
end-of-turn = <|im_end|>) and a Qwen-style one (EOS <|endoftext|>, end-of-turn
<|im_end|>). A sequence ends with exactly the token the sampler stopped on, nothing is
appended after a `length` finish, and rows over max_len are dropped and counted."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from actors.sampler import PROMPT_TOO_LONG, completion_rows, completion_text
from actors.sequences import encode, encode_row, end_of_turn_id, stop_token_ids, token_ids
from actors.store import RunStore

# Qwen2.5's chat template, shortened (no tools): a default system turn, ChatML turns.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_style_tokenizer():
    """A byte-level tokenizer with Qwen's special tokens and template: EOS <|endoftext|>
    differs from the end-of-turn token <|im_end|> (as for Qwen2.5-Math base models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_STYLE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen_style_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's own tokenizer, read from the GGUF the package ships (the
    built model directory saves exactly this tokenizer)."""
    from transformers import AutoTokenizer

    from pipeline.real_model import RealModelUnavailable, shipped_file

    try:
        path, _ = shipped_file()
    except RealModelUnavailable as e:
        pytest.skip(str(e))
    pytest.importorskip("gguf")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _id(tok, text):
    return tok.convert_tokens_to_ids(text)


def test_stop_tokens_of_smollm2(smol_tok):
    im_end = _id(smol_tok, "<|im_end|>")
    assert smol_tok.eos_token == "<|im_end|>"
    assert end_of_turn_id(smol_tok) == im_end
    assert stop_token_ids(smol_tok) == [im_end]


def test_stop_tokens_of_a_qwen_style_template_are_eos_and_end_of_turn(qwen_tok):
    eos, im_end = _id(qwen_tok, "<|endoftext|>"), _id(qwen_tok, "<|im_end|>")
    assert eos != im_end and qwen_tok.eos_token_id == eos
    assert end_of_turn_id(qwen_tok) == im_end
    assert stop_token_ids(qwen_tok) == [eos, im_end]


def test_a_template_without_an_end_token_falls_back_to_eos(qwen_tok):
    tok = qwen_style_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(tok) == tok.eos_token_id


@pytest.mark.parametrize("tok_name", ["smol_tok", "qwen_tok"])
def test_sequence_ends_with_exactly_the_stop_token_and_nothing_after_length(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    from actors.prompt_templates import render_prompt

    prompt = render_prompt(tok, "qwen-boxed", "What is 2 + 3?")
    p = token_ids(tok, prompt)
    for stop in {tok.eos_token, "<|im_end|>"}:  # whichever the sampler stopped on
        ex = encode(tok, prompt, "2+3=5. \\boxed{5}" + stop, 512)
        assert ex["ids"][:len(p)] == p and ex["n_prompt"] == len(p)
        assert ex["ids"][-1] == _id(tok, stop) and ex["ids"][-2] not in stop_token_ids(tok)
    truncated = encode(tok, prompt, "2+3 is a number that", 512)  # a `length` finish: nothing appended
    assert truncated["ids"] == p + token_ids(tok, "2+3 is a number that")
    assert truncated["ids"][-1] not in stop_token_ids(tok)
    gold = encode(tok, prompt, "2+3=5. \\boxed{5}", 512, close_turn=True)  # a demonstration closes its turn
    assert gold["ids"][-1] == _id(tok, "<|im_end|>") and gold["ids"][-2] not in stop_token_ids(tok)
    assert encode(tok, prompt, "\\boxed{5}<|im_end|>", 512, close_turn=True)["ids"][-2:] != [_id(tok, "<|im_end|>")] * 2


def test_rows_longer_than_max_len_are_dropped_not_cut(qwen_tok):
    prompt, completion = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "hello<|im_end|>"
    n = len(token_ids(qwen_tok, prompt)) + len(token_ids(qwen_tok, completion))
    ex, why = encode_row(qwen_tok, prompt, completion, n)
    assert why is None and len(ex["ids"]) == n  # max_len counts prompt + response tokens
    assert encode_row(qwen_tok, prompt, completion, n - 1) == (None, "too_long")
    assert encode_row(qwen_tok, prompt, "", n) == (None, "empty")


def _output(tok, text, finish, stop_reason, ids):
    return SimpleNamespace(text=text, finish_reason=finish, stop_reason=stop_reason, token_ids=ids)


def test_completion_keeps_the_token_it_stopped_on(qwen_tok):
    eos, im_end = _id(qwen_tok, "<|endoftext|>"), _id(qwen_tok, "<|im_end|>")
    body = token_ids(qwen_tok, "\\boxed{5}")
    # vLLM leaves a special stop token out of `text`; it is in token_ids.
    assert completion_text(qwen_tok, _output(qwen_tok, "\\boxed{5}", "stop", im_end, body + [im_end])) \
        == "\\boxed{5}<|im_end|>"
    assert completion_text(qwen_tok, _output(qwen_tok, "\\boxed{5}", "stop", None, body + [eos])) \
        == "\\boxed{5}<|endoftext|>"
    assert completion_text(qwen_tok, _output(qwen_tok, "\\boxed{5} and", "length", None, body + [1])) \
        == "\\boxed{5} and"
    # A stop string is kept in the text by the engine (include_stop_str_in_output).
    assert completion_text(qwen_tok, _output(qwen_tok, "5 </answer>", "stop", "</answer>", body)) == "5 </answer>"


def test_skipped_prompt_rows():
    out = SimpleNamespace(outputs=[SimpleNamespace(text="a", finish_reason="stop", stop_reason=None, token_ids=[1])] * 2)
    rows = completion_rows(["p1", "p2"], ["P1", "P2"], [None, out], None, n=2)
    assert [(r["prompt_id"], r["sample_idx"], r["finish_reason"], r["num_tokens"]) for r in rows] == [
        ("p1", 0, PROMPT_TOO_LONG, 0), ("p1", 1, PROMPT_TOO_LONG, 0), ("p2", 0, "stop", 1), ("p2", 1, "stop", 1)]


def test_over_long_training_rows_are_counted_and_excluded(qwen_tok, tmp_path):
    from actors.train_loop import load_units_counted

    store = RunStore(str(tmp_path))
    prompt = qwen_tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                          add_generation_prompt=True)
    short, long = "\\boxed{5}<|im_end|>", "Let me think. " * 40 + "\\boxed{5}<|im_end|>"
    max_len = len(token_ids(qwen_tok, prompt)) + len(token_ids(qwen_tok, short)) + 10
    store.write_rows("positives.parquet", [{"prompt_id": f"p{i}", "sample_idx": 0, "prompt": prompt,
                                            "completion": c} for i, c in enumerate([short, long, short, long, long])])
    store.write_rows("pairs.parquet", [{"prompt_id": f"p{i}", "pair_idx": 0, "prompt": prompt, "chosen": short,
                                        "rejected": r} for i, r in enumerate([short + " ", long])])
    cfg = {"store_uri": store.uri, "reference_file": None, "template": None, "max_len": max_len}
    units, counts = load_units_counted({**cfg, "data": "positives", "data_file": "positives.parquet"}, qwen_tok)
    assert counts == {"data_rows": 5, "rows_used": 2, "rows_dropped_too_long": 3, "rows_dropped_empty": 0}
    assert all(len(u["ex"]["ids"]) <= max_len and u["ex"]["ids"][-1] == _id(qwen_tok, "<|im_end|>") for u in units)
    units, counts = load_units_counted({**cfg, "data": "pairs", "data_file": "pairs.parquet"}, qwen_tok)
    assert (len(units), counts["rows_dropped_too_long"]) == (1, 1)  # a pair goes when either side is too long


def test_ray_worker_memory_shares_the_largest_node_among_the_workers_it_fits(monkeypatch):
    """A worker's memory is the largest alive node's, divided among as many workers as its
    CPUs (or GPUs) fit of one worker's resources; the cluster's state is faked."""
    import ray

    from pipeline import train_stage

    gib = train_stage.GIB
    nodes = [{"Alive": False, "Resources": {"memory": 64 * gib, "CPU": 64, "GPU": 8}},  # dead: never counted
             {"Alive": True, "Resources": {"memory": 8 * gib, "CPU": 4}},
             {"Alive": True, "Resources": {"memory": 2 * gib, "CPU": 2}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    label = {"verifine_worker": 0.001}  # ray.worker_resource: a label, not a slot
    assert train_stage.ray_worker_memory(3, {"CPU": 2, **label}) == (4.0, "2 worker(s) on the largest node")
    assert train_stage.ray_worker_memory(3, {"CPU": 1}) == (8 / 3, "3 worker(s) on the largest node")
    assert train_stage.ray_worker_memory(2, {"CPU": 8})[0] == 8.0  # fits none: still one worker's share
    nodes[1]["Resources"].update(GPU=2, memory=16 * gib)
    assert train_stage.ray_worker_memory(4, {"GPU": 1, **label}) == (8.0, "2 worker(s) on the largest node")


def test_memory_estimate_parts(monkeypatch):
    from pipeline import train_stage
    from pipeline.config import load_config

    shape = {"params": 1_000_000_000, "hidden": 2048, "layers": 24, "intermediate": 8192, "vocab": 150_000}
    t = load_config(None, ["train.num_workers=8", "train.micro_batch_tokens=16384", "train.max_len=2048",
                           "train.zero_stage=2"]).train
    base = train_stage.estimate_memory(shape, t, pairs=False)
    ckpt = train_stage.estimate_memory(shape, t.model_copy(update={"gradient_checkpointing": True}), pairs=False)
    z3 = train_stage.estimate_memory(shape, t.model_copy(update={"zero_stage": 3}), pairs=False)
    z0 = train_stage.estimate_memory(shape, t.model_copy(update={"zero_stage": 0}), pairs=False)
    assert (z0["optimizer"], z0["gradients"]) == pytest.approx((8 * base["optimizer"], 8 * base["gradients"]), rel=1e-3)
    assert ckpt["activations"] < base["activations"] / 5 and ckpt["weights"] == base["weights"]
    assert z3["weights"] == pytest.approx(base["weights"] / 8, rel=1e-3)
    assert base["optimizer"] == pytest.approx(8 * 1e9 / 8 / 2 ** 30, rel=1e-3)  # AdamW fp32 state, ZeRO-2 over 8
    logs = []
    monkeypatch.setattr(train_stage, "model_shape", lambda source: shape)
    monkeypatch.setattr(train_stage, "ray_worker_memory", lambda workers, resources: (1.0, "test node"))
    est = train_stage.check_memory("some-model", t, False, logs.append)
    assert "warning" in est and any("WARNING" in line and "gradient_checkpointing" in line for line in logs)
