"""Tests for actors/verifier.py with the real math-verify (no mocks)."""

import json
import random
import re
import time
from pathlib import Path

import pytest

from actors.verifier import VERDICTS, Verifier, judge, verify_with_ray

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"
MATH500 = BENCHMARKS / "math_oai.jsonl"

NESTED_POWER = "\\boxed{9^{9^{9^{9^{9^{9}}}}}}"


def _garbage(n: int = 100_000) -> str:
    rng = random.Random(0)
    return "".join(rng.choice("{}\\^_$()[]0123456789abx+-*/ boxedfrac") for _ in range(n))


HOSTILE = [
    (NESTED_POWER, "1"),
    (_garbage(), "1"),
    ("\\boxed{\\frac{1}{2", "\\frac{1}{2}"),
    ("\\boxed{\udcff}", "1"),  # lone surrogate: not encodable as UTF-8
    (b"\\boxed{\xff\xfe}", "1"),
    ("", ""),
    ("\\boxed{1}", ""),
    (None, "1"),
    ("\\boxed{1}", None),
]


# ---------------------------------------------------------------- data helpers


def _math500() -> list[dict]:
    if not MATH500.exists():
        pytest.skip(f"MATH-500 not found at {MATH500} (the shared/ data dir beside the repo)")
    return [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]


def _strip_delims(answer: str) -> str:
    s = re.sub(r"\\(left|right)\s*", "", answer)
    return s.replace("\\!", "").strip()


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def perturb(answer: str) -> str | None:
    """A surely-wrong variant of a gold answer, or None if no rule applies."""
    a = _strip_delims(answer)
    if re.fullmatch(r"-?\d+", a):
        return str(int(a) + 1)
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", a)
    if m:
        sign, num, den = m.groups()
        return f"{sign}\\frac{{{int(num) + 1}}}{{{den}}}"
    if len(a) < 2 or a[0] not in "([" or a[-1] not in ")]" or "\\cup" in a:
        return None
    inner = _split_top_level(a[1:-1])
    if len(inner) < 2:
        return None
    if a[0] == "(" and a[-1] == ")" and "\\infty" not in a:
        if inner[0] == inner[1]:
            return None
        return "(" + ", ".join([inner[1], inner[0]] + inner[2:]) + ")"
    if len(inner) == 2:  # an interval: flip the bracket of a finite end
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        if "\\infty" not in inner[1]:
            return a[:-1] + flip[a[-1]]
        if "\\infty" not in inner[0]:
            return flip[a[0]] + a[1:]
    return None


def _replace_last_boxed(text: str, new: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[:start] + "\\boxed{" + new + "}" + text[i + 1:]
    return None


# ---------------------------------------------------------------- perturbation rules


@pytest.mark.parametrize("gold, wrong", [
    ("27", "28"),
    ("-3", "-2"),
    ("\\frac{1}{2}", "\\frac{2}{2}"),
    ("-\\dfrac{3}{4}", "-\\frac{4}{4}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(\\frac{\\pi}{2}, 3)"),
    ("[2,5)", "[2,5]"),
    ("(-\\infty, 3]", "(-\\infty, 3)"),
    ("(4, \\infty)", "[4, \\infty)"),
    ("x^2+1", None),
    ("(-\\infty,-2) \\cup (3,\\infty)", None),
])
def test_perturb_rules(gold, wrong):
    assert perturb(gold) == wrong


# ---------------------------------------------------------------- judge() semantics


@pytest.mark.parametrize("completion, gold, verdict", [
    ("so the answer is $\\boxed{27}$.", "27", "correct"),
    ("$\\boxed{0.5}$", "\\frac{1}{2}", "correct"),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "(3, \\frac{\\pi}{2})", "correct"),
    ("$\\boxed{[2,5)}$", "[2,5)", "correct"),
    ("$\\boxed{[2,5]}$", "[2,5)", "incorrect"),
    ("$\\boxed{28}$", "27", "incorrect"),
    ("I give up.", "27", "no_answer"),
    ("$\\boxed{27}$", 27.0, "correct"),  # amc23 stores golds as JSON numbers
])
def test_judge_basic(completion, gold, verdict):
    assert judge(completion, gold)[0] == verdict


def test_last_box_wins():
    filler = " Let us double-check this carefully before we finish." * 3
    text = "First \\boxed{3}." + filler + " So the answer is \\boxed{7}."
    assert judge(text, "7") == ("correct", "7")
    assert judge(text, "3")[0] == "incorrect"


@pytest.mark.parametrize("earlier", ["We get $\\boxed{5}$.", "So the answer is $5$."])
def test_unparseable_last_box_does_not_fall_back(earlier):
    # math-verify's default extraction_mode="any_match" would judge these correct.
    filler = " Let us double-check this carefully before we finish." * 3
    text = earlier + filler + " Final: $\\boxed{\\frac{}{}}$"
    assert judge(text, "5") == ("incorrect", "\\frac{}{}")


@pytest.mark.parametrize("completion, gold", HOSTILE[1:])
def test_judge_in_process_never_raises(completion, gold):
    verdict, pred = judge(completion, gold)
    assert verdict in VERDICTS and isinstance(pred, str)


def test_judge_in_process_times_out():
    # math-verify's SIGALRM timeout is a BaseException; judge must turn it into a verdict.
    t0 = time.monotonic()
    assert judge(NESTED_POWER, "1", timeout_s=1)[0] == "timeout"
    assert time.monotonic() - t0 < 5


def test_judge_bad_input_verdicts():
    assert judge(None, "1")[0] == "error"
    assert judge(b"\\boxed{1}", "1")[0] == "error"
    assert judge("\\boxed{\udcff}", "1")[0] == "error"
    assert judge("", "1") == ("no_answer", "")


# ---------------------------------------------------------------- quality on MATH-500


def test_math500_quality():
    rows = _math500()
    accepted = [judge(r["solution"], r["answer"])[0] == "correct" for r in rows]
    wrong = []
    for r in rows:
        bad = perturb(r["answer"])
        text = _replace_last_boxed(r["solution"], bad) if bad else None
        if text:
            wrong.append(judge(text, r["answer"])[0])
    accept_rate = sum(accepted) / len(accepted)
    reject_rate = sum(v != "correct" for v in wrong) / len(wrong)
    print(f"\nMATH-500 gold accepted: {sum(accepted)}/{len(accepted)} = {accept_rate:.2%}")
    print(f"MATH-500 perturbed rejected: {sum(v != 'correct' for v in wrong)}"
          f"/{len(wrong)} = {reject_rate:.2%}")
    assert len(wrong) >= 200  # the rules must cover a real share of the set
    assert accept_rate >= 0.99
    assert reject_rate >= 0.995


# ---------------------------------------------------------------- hard deadline


def test_verifier_hostile_batch_is_bounded():
    deadline = 5.0
    pairs = HOSTILE + [("$\\boxed{\\frac{1}{2}}$", "0.5")]
    t0 = time.monotonic()
    with Verifier(deadline_s=deadline, mv_timeout_s=1) as v:
        results = v.judge_many(pairs)
    elapsed = time.monotonic() - t0
    assert len(results) == len(pairs)
    assert all(verdict in VERDICTS and isinstance(pred, str) for verdict, pred in results)
    assert results[0][0] == "timeout"  # the nested power
    assert results[7][0] == "error"  # None
    assert results[-1][0] == "correct"  # the child still works afterwards
    assert elapsed < 3 * deadline, elapsed


def test_verifier_kills_child_past_deadline():
    # A deadline below math-verify's own 1 s timeout forces the kill path.
    with Verifier(deadline_s=0.3, mv_timeout_s=1) as v:
        t0 = time.monotonic()
        assert v.judge(NESTED_POWER, "1") == ("timeout", "")
        assert time.monotonic() - t0 < 5
        assert v.restarts == 1
        v.deadline_s = 30  # the restarted child works (generous: the machine may be busy)
        assert v.judge("$\\boxed{42}$", "42") == ("correct", "42")


def test_verifier_unpicklable_input():
    with Verifier(deadline_s=5) as v:
        assert v.judge(lambda: 0, "1") == ("error", "")
        assert v.judge("$\\boxed{1}$", "1")[0] == "correct"


# ---------------------------------------------------------------- ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a session-wide Ray from another module: share, keep it
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_verify_with_ray_matches_serial(ray_cluster):
    rows = _math500()[:20]
    completions = [r["solution"] for r in rows[:10]]
    completions += [_replace_last_boxed(r["solution"], "-1") for r in rows[10:]]
    completions += ["no box here", None]
    golds = [r["answer"] for r in rows] + ["1", "1"]
    expected = [judge(c, g) for c, g in zip(completions, golds)]
    assert verify_with_ray(completions, golds, num_tasks=2, deadline_s=10, min_items_per_task=1) == expected
    assert verify_with_ray([], [], num_tasks=2, deadline_s=10) == []


@pytest.mark.slow
def test_a_batch_smaller_than_two_tasks_is_judged_by_this_process(ray_cluster, monkeypatch):
    """Below two tasks' worth of items no Ray task starts (a worker and its verifier cost
    more than the judging): the caller's own Verifier judges, with the same verdicts."""
    import actors.verifier as verifier

    monkeypatch.setattr(verifier, "_process_verifier", None)
    rows = _math500()[:12]
    completions = [r["solution"] for r in rows[:6]] + [_replace_last_boxed(r["solution"], "-1") for r in rows[6:]]
    golds = [r["answer"] for r in rows]
    expected = [judge(c, g) for c, g in zip(completions, golds)]
    try:
        assert verify_with_ray(completions, golds, num_tasks=2, deadline_s=10, min_items_per_task=6) == expected
        assert verifier._process_verifier is None  # 12 items = two tasks of 6: judged in Ray tasks
        assert verify_with_ray(completions, golds, num_tasks=2, deadline_s=10, min_items_per_task=7) == expected
        assert verifier._process_verifier is not None and verifier._process_verifier._proc.is_alive()
    finally:
        if verifier._process_verifier is not None:
            verifier._process_verifier.close()
