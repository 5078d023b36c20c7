"""The run report: report.md (a table in the shape of the DFT paper's Table 2, pass@k,
verify yield, training summaries), report.json with the same numbers, and PNG plots.
Everything is read back from stored stage outputs, so `verifine report RUN_DIR` rebuilds
it without re-running anything."""
from __future__ import annotations

import io
import json

from pipeline.metrics import summarize
from pipeline.ray_session import worker_remote_args

PLOTS = ("accuracy.png", "pass_at_k.png", "training_curves.png", "token_prob_hist.png", "kl_to_reference.png",
         "dpo_pair_weights.png")


VERSION = 1


def collect(store, manifests: dict, models: list[str], benches: list[str], n: int) -> dict:
    """Numbers of the report, recomputed from the stored per-sample eval rows of the given
    stage manifests (only stages done under the current configuration are passed in)."""
    from pipeline.eval_stage import summarize_judged

    evals: dict = {}
    for m in models:
        for b in benches:
            man = manifests.get(f"eval/{m}/{b}")
            if not man:
                continue
            judged = store.read_rows(next(f for f in man["files"] if f.endswith("judged.parquet")))
            evals.setdefault(m, {})[b] = summarize_judged(judged, n)
    verify = (manifests.get("verify") or {}).get("stats", {})
    train = {}
    for name, man in sorted(manifests.items()):
        if name.startswith("train/"):
            rel = next(f for f in man["files"] if f.endswith("metrics.jsonl"))
            history = [json.loads(l) for l in store.read_bytes(rel).decode().splitlines() if l]
            train[name[len("train/"):]] = {"steps": len(history), "final": history[-1] if history else {},
                                           "history": history}
    for m, per in evals.items():
        scores = [per[b]["avg_at_n"] for b in benches if b in per]
        per["_average"] = sum(scores) / len(scores) if scores else None
    return {"models": models, "benchmarks": benches, "n": n, "eval": evals, "verify": verify, "train": train}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(data: dict) -> str:
    models, benches, n = data["models"], data["benchmarks"], data["n"]
    lines = ["# verifine report", "",
             f"## Accuracy: avg@{n} (%) with 95% bootstrap CI over problems", "",
             "| model | " + " | ".join(benches) + " | average |",
             "|---|" + "---|" * (len(benches) + 1)]
    for m in models:
        per = data["eval"].get(m, {})
        cells = []
        for b in benches:
            s = per.get(b)
            cells.append("-" if not s else f"{_pct(s['avg_at_n'])} [{_pct(s['avg_ci'][0])}, {_pct(s['avg_ci'][1])}]")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(per.get('_average'))} |")
    lines += ["", f"## pass@k (%)", ""]
    for b in benches:
        ks = next((list(data["eval"][m][b]["pass_at_k"]) for m in models if b in data["eval"].get(m, {})), [])
        if not ks:
            continue
        lines += [f"**{b}**", "", "| model | " + " | ".join(f"pass@{k}" for k in ks) + " | mean tokens | truncated |",
                  "|---|" + "---|" * (len(ks) + 2)]
        for m in models:
            s = data["eval"].get(m, {}).get(b)
            if s:
                lines.append(f"| {m} | " + " | ".join(_pct(s["pass_at_k"][k]) for k in ks)
                             + f" | {s['mean_response_tokens']:.1f} | {_pct(s['truncation_rate'])} |")
        lines.append("")
    v = data["verify"]
    if v:
        lines += ["## Verified training data", "",
                  f"- samples {v.get('samples')} over {v.get('prompts')} prompts; verdicts {v.get('verdicts')}",
                  f"- pass@1 {_pct(v.get('pass_at_1'))}%; prompts all-correct {_pct(v.get('prompts_all_correct'))}%, "
                  f"mixed {_pct(v.get('prompts_mixed'))}%, all-wrong {_pct(v.get('prompts_all_wrong'))}%",
                  f"- positives {v.get('positives')}, preference pairs {v.get('pairs')}", ""]
    if data["train"]:
        lines += ["## Training", "", "| run | steps | final loss | token prob | KL to reference | implicit reward "
                  "| DPO pair weight σ(−Δ) |", "|---|---|---|---|---|---|---|"]
        for o, t in data["train"].items():
            f = t["final"]
            fmt = lambda k: "-" if f.get(k) is None else f"{f[k]:.4f}"
            lines.append(f"| {o} | {t['steps']} | {fmt('loss')} | {fmt('token_prob')} | {fmt('kl_to_reference')} "
                         f"| {fmt('implicit_reward')} | {fmt('pair_weight')} |")
        lines.append("")
    lines += render_families(data)
    if data.get("excluded"):
        lines += ["## Left out", "", "These stages do not match the current configuration (stale, missing or broken; "
                  "`verifine status` shows why) and are not in the tables above:", ""]
        lines += [f"- {name}" for name in data["excluded"]] + [""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    return "\n".join(lines)


def _avg_cell(data: dict, model: str) -> str:
    return _pct(data["eval"].get(model, {}).get("_average"))


def sweeps(runs: list[dict]) -> dict[tuple, list[dict]]:
    """(family, parent) -> the runs of one sweep (members that differ by swept values)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["swept"]:
            groups.setdefault((r["family"], r["init"]), []).append(r)
    return groups


def render_families(data: dict) -> list[str]:
    """Each sweep as a table with its parent and the base; each chain as parent -> child."""
    runs, benches = data.get("runs") or [], data["benchmarks"]
    lines = []
    for (family, parent), members in sweeps(runs).items():
        keys = sorted({k for r in members for k, _ in r["swept"]})
        lines += [f"## Sweep: {family}" + (f" from {parent}" if parent != "base" else ""), "",
                  "| model | " + " | ".join(keys) + " | " + " | ".join(benches) + " | average | final KL to reference |",
                  "|---|" + "---|" * (len(keys) + len(benches) + 2)]
        rows = [("base", {})] + ([(parent, {})] if parent != "base" else []) + [(r["name"], dict(r["swept"])) for r in members]
        for name, swept in rows:
            per = data["eval"].get(name, {})
            kl = (data["train"].get(name) or {}).get("final", {}).get("kl_to_reference")
            lines.append(f"| {name} | " + " | ".join(str(swept.get(k, "")) for k in keys) + " | "
                         + " | ".join(_pct(per[b]["avg_at_n"]) if b in per else "-" for b in benches)
                         + f" | {_avg_cell(data, name)} | {'-' if kl is None else f'{kl:.4f}'} |")
        lines.append("")
    chains = [r for r in runs if r["init"] != "base"]
    if chains:
        lines += ["## Chains: parent → child (average avg@n, %)", "", "| parent | child | parent | child | change |",
                  "|---|---|---|---|---|"]
        for r in chains:
            p, c = data["eval"].get(r["init"], {}).get("_average"), data["eval"].get(r["name"], {}).get("_average")
            change = "-" if p is None or c is None else f"{100 * (c - p):+.1f}"
            lines.append(f"| {r['init']} | {r['name']} | {_pct(p)} | {_pct(c)} | {change} |")
        lines.append("")
    return lines


def plot_kl_curves(data: dict) -> bytes:
    """KL-to-reference along training: every sweep's members (else every run that logs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for group in sweeps(data.get("runs") or []).values() for r in group]
    names = [n for n in names if n in data["train"]] or list(data["train"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        hist = [h for h in data["train"][name]["history"] if h.get("kl_to_reference") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["kl_to_reference"] for h in hist], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(policy || reference) per token")
    ax.set_title("KL to reference during training")
    if ax.lines:
        ax.legend(fontsize=7)
    return _png(fig)


def plot_dpo_pair_weights(data: dict) -> bytes:
    """DPO's per-pair weight σ(−Δ) on its SFT-like update, summed over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, t in data["train"].items():
        hists = [h["pair_weight_hist"] for h in t["history"] if h.get("pair_weight_hist")]
        if hists:
            counts = np.sum(np.array(hists, dtype=float), axis=0)
            edges = np.linspace(0, 1, len(counts) + 1)
            ax.stairs(counts / max(counts.sum(), 1), edges, label=name)
    ax.set_xlabel("σ(−Δ): weight of a pair's SFT-like update")
    ax.set_ylabel("share of pairs")
    ax.set_title("DPO pair weights over training")
    if ax.patches or ax.lines:
        ax.legend(fontsize=7)
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_accuracy(data: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, benches = data["models"], data["benchmarks"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(models)) / 2), 4))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        per = data["eval"].get(m, {})
        ys = [100 * per[b]["avg_at_n"] if b in per else 0 for b in benches]
        lo = [ys[j] - 100 * per[b]["avg_ci"][0] if b in per else 0 for j, b in enumerate(benches)]
        hi = [100 * per[b]["avg_ci"][1] - ys[j] if b in per else 0 for j, b in enumerate(benches)]
        ax.bar(np.arange(len(benches)) + i * width, ys, width, yerr=[lo, hi], capsize=3, label=m)
    ax.set_xticks(np.arange(len(benches)) + width * (len(models) - 1) / 2, benches)
    ax.set_ylabel(f"avg@{data['n']} (%)")
    ax.set_title("Accuracy with 95% bootstrap CI")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_pass_at_k(data: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = data["benchmarks"]
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.5), squeeze=False)
    for ax, b in zip(axes[0], benches):
        for m in data["models"]:
            s = data["eval"].get(m, {}).get(b)
            if s:
                ks = [int(k) for k in s["pass_at_k"]]
                ax.plot(ks, [100 * s["pass_at_k"][str(k)] for k in ks], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_title(b)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def plot_training(data: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for o, t in data["train"].items():
        steps = [h["step"] for h in t["history"]]
        axes[0].plot(steps, [h["loss"] for h in t["history"]], label=o)
        axes[1].plot(steps, [h.get("token_prob") for h in t["history"]], label=o)
    axes[0].set_title("training loss")
    axes[1].set_title("mean target-token probability")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    return _png(fig)


def plot_token_probs(probs: dict[str, list[float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 21)
    for m, p in probs.items():
        if p:
            ax.hist(p, bins=bins, histtype="step", linewidth=1.5, label=m, density=True)
    ax.set_yscale("log")
    ax.set_xlabel("probability of the target token")
    ax.set_title("Token probabilities on held-out positives (cf. DFT paper Fig. 2)")
    ax.legend(fontsize=8)
    return _png(fig)


def heldout_positives(store, manifests: dict, bench: str, limit: int = 64) -> list[dict]:
    """Correct answers of the base model on the first eval benchmark: never trained on."""
    man = manifests.get(f"eval/base/{bench}")
    if not man:
        return []
    rows = store.read_rows(next(f for f in man["files"] if f.endswith("judged.parquet")))
    return [r for r in rows if r["verdict"] == "correct" and r["finish_reason"] == "stop"][:limit]


def token_probabilities(store, manifests: dict, bench: str, base_source, max_len: int, use_gpu: bool,
                        log=print) -> dict[str, list[float]]:
    """Per-token target probabilities of base and each trained model on held-out positives,
    scored as Ray tasks (each materializes its model on its own node)."""
    import math

    import ray

    from actors.model_source import store_model_source

    rows = heldout_positives(store, manifests, bench)
    if not rows:
        return {}
    sources = {"base": base_source}
    for name, man in sorted(manifests.items()):
        if name.startswith("train/"):
            sources[name[len("train/"):]] = store_model_source(store.uri, man)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, **worker_remote_args())(_score)
    refs = {m: task.remote(src, max_len, [r["prompt"] for r in rows], [r["completion"] for r in rows])
            for m, src in sources.items()}
    return {m: [math.exp(x) for seq in ray.get(ref) for x in seq] for m, ref in refs.items()}


def _score(model_source, max_len, prompts, completions):
    from actors.reference import ReferenceScorer

    return [s or [] for s in ReferenceScorer(model_source, max_len).score(prompts, completions)]


def write_report(store, work_dir: str, manifests: dict, c, base_source, log=print,
                 excluded: list[str] = (), stable_copy: bool = True) -> tuple[list[str], dict]:
    """report.md / report.json / plots from the given stage manifests (with stable_copy,
    also in report/ beside the stage's manifest, a stable place to look); `c` is the report
    stage's config view (models, benchmarks, eval.n, train.max_len, train.use_gpu);
    `excluded` names eval stages left out because they do not match the configuration."""
    models, benches = list(c.report.models), list(c.report.benchmarks)
    data = collect(store, manifests, models, benches, c.eval.n)
    data["runs"] = [r for r in c.report.runs if f"train/{r['name']}" in manifests]
    data["excluded"] = sorted(excluded)
    try:
        probs = token_probabilities(store, manifests, benches[0], base_source, c.train.max_len, c.train.use_gpu, log)
    except Exception as e:  # the histogram is an analysis extra; a failure must not lose the report
        log(f"  token-probability histogram skipped: {type(e).__name__}: {e}")
        probs = {}
    data["token_prob_summary"] = {m: {"tokens": len(p), "mean": sum(p) / len(p) if p else None}
                                  for m, p in probs.items()}
    files = {
        "report.md": render_markdown(data).encode(),
        "report.json": json.dumps({k: v for k, v in data.items()}, indent=2, default=str).encode(),
        "accuracy.png": plot_accuracy(data), "pass_at_k.png": plot_pass_at_k(data),
        "training_curves.png": plot_training(data), "token_prob_hist.png": plot_token_probs(probs),
        "kl_to_reference.png": plot_kl_curves(data), "dpo_pair_weights.png": plot_dpo_pair_weights(data),
    }
    out = []
    for name, blob in files.items():
        for where in (work_dir, "report") if stable_copy else (work_dir,):
            store.write_bytes(f"{where}/{name}", blob)
            out.append(f"{where}/{name}")
    log(f"  report: {store.full_uri('report' if stable_copy else work_dir, 'report.md')}")
    return out, {"models": len(data["eval"]), "benchmarks": len(data["benchmarks"])}


def run_report(ctx):
    from pipeline.external import base_model_source

    base = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    return write_report(ctx.store, ctx.work_dir, ctx.upstream, ctx.cfg, base, ctx.log)
