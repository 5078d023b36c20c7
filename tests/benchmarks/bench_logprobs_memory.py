"""Peak memory and time of forward+backward of per-token log-probs at Qwen's vocabulary.

(a) naive: full [tokens, V] fp32 logits, log_softmax, gather
(b) actors.token_logprobs: chunked, logits recomputed in backward

Each runs in a fresh subprocess; memory is the growth of peak RSS (ru_maxrss) over the
current RSS once inputs (hidden, lm_head weight, targets) are allocated. The lm_head weight's
gradient ([V, H] fp32) is included in both figures. Not a pass/fail test; it prints.

    python tests/benchmarks/bench_logprobs_memory.py [--hidden 896 --tokens 4096 --chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, vocab: int, hidden: int, tokens: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    from actors.token_logprobs import token_logprobs

    torch.manual_seed(0)
    # Warm up thread pools / kernels on tiny inputs so they do not count as op memory.
    token_logprobs(torch.randn(4, 8, requires_grad=True), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)).sum().backward()

    # In place, so that no freed temporary has already raised the peak.
    h = torch.randn(tokens, hidden).mul_(0.05).requires_grad_()
    w = torch.randn(vocab, hidden).mul_(0.05).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))
    baseline = _current_rss_bytes()
    assert _peak_rss_bytes() - baseline < 64 * 2**20, "setup left a peak above the baseline"

    start = time.perf_counter()
    if method == "naive":
        logp = F.linear(h, w).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    else:
        logp = token_logprobs(h, w, y, chunk_tokens=chunk)
    logp.sum().backward()
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "peak_extra_bytes": _peak_rss_bytes() - baseline,
        "seconds": seconds,
        # Cross-check that both computed the same thing.
        "logp_sum": logp.sum().item(),
        "grad_w_norm": w.grad.norm().item(),
        "grad_h_norm": h.grad.norm().item(),
    }


def run_in_subprocess(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
           "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--tokens", str(args.tokens), "--chunk", str(args.chunk)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)  # Qwen2.5
    p.add_argument("--hidden", type=int, default=896)  # Qwen2.5-0.5B; 1536 is the 1.5B
    p.add_argument("--tokens", type=int, default=4096)  # B*T
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--worker", choices=["naive", "chunked"])
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.hidden, args.tokens, args.chunk)))
        return

    gib = 2**30
    print(f"vocab={args.vocab} hidden={args.hidden} tokens={args.tokens} chunk={args.chunk} fp32, CPU")
    print(f"(one fp32 [tokens, V] logits copy = {args.tokens * args.vocab * 4 / gib:.2f} GiB, "
          f"lm_head weight/grad = {args.vocab * args.hidden * 4 / gib:.2f} GiB)")  # fmt: skip
    results = {m: run_in_subprocess(m, args) for m in ("naive", "chunked")}
    for r in results.values():
        print(f"{r['method']:>8}: peak +{r['peak_extra_bytes'] / gib:6.2f} GiB  {r['seconds']:6.1f} s  "
              f"logp_sum={r['logp_sum']:.6g} |grad_w|={r['grad_w_norm']:.6g} |grad_h|={r['grad_h_norm']:.6g}")  # fmt: skip
    naive, chunked = results["naive"], results["chunked"]
    print(f"memory ratio chunked/naive = {chunked['peak_extra_bytes'] / naive['peak_extra_bytes']:.3f}  "
          f"(target <= 0.35); time ratio = {chunked['seconds'] / naive['seconds']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
