"""Answer verification with math-verify, bounded by a hard per-item deadline.

`judge` is the pure check. `Verifier` runs it in one killable child process so a
hostile completion costs at most `deadline_s`. `verify_with_ray` shards a large batch
over Ray tasks and judges a small one in the calling process; each process (a Ray worker
or the driver) keeps one `Verifier` warm across calls.

Extraction: the prediction is the completion's last \\boxed{} (math-verify also keeps
boxes directly before it that are joined by "and"/"or"/","; that is its multi-answer
rule). If that box does not parse we do not fall back to earlier matches
("first_match"). Completions without a box fall back to math-verify's anchors
("final answer is", "answer:", then the last latex/number).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import threading
from itertools import product

VERDICTS = ("correct", "incorrect", "no_answer", "timeout", "error")

DEFAULT_MV_TIMEOUT_S = 2  # math-verify's SIGALRM timeout, per parse / comparison (int s)
DEFAULT_DEADLINE_S = 10.0  # hard wall-clock bound per item, enforced by killing the child
CHILD_MEMORY_BYTES = 4 << 30  # address-space cap: huge integers fail fast, not swap


class _Timeout(Exception):
    """An internal signal that math-verify gave up on time."""


# math-verify (and sympy) is imported on first use: the Ray worker that owns a
# Verifier's child never judges anything itself, so it need not pay ~0.5 s to import it.
@functools.lru_cache(maxsize=1)
def _extraction_configs() -> tuple[list, list]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Boxed priority 0 puts \boxed{} above every anchor ("answer:" 100, bare latex 300).
    pred = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    return pred, gold


def _is_clean_text(x) -> bool:
    # Surrogates cannot be encoded and make latex2sympy/pyarrow fail later; reject early.
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse(text: str, config: list, timeout_s: int | None, mode: str) -> list:
    # raise_on_error=True is the only way to see math-verify's timeout: otherwise it
    # logs and returns [], which would read as "no answer".
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return parse(text, config, extraction_mode=mode,
                     parsing_timeout=timeout_s, raise_on_error=True)
    except TimeoutException as e:
        raise _Timeout from e


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    # Golds repeat (k samples per prompt), so parse each once. "$...$" makes plain
    # latex golds like "\frac{1}{2}" or "[2,5)" parse as latex.
    return tuple(_parse("$" + gold + "$", _extraction_configs()[1], timeout_s, "any_match"))


def _pred_text(pred: list) -> str:
    # math-verify appends the extracted latex string; never str() a sympy object here,
    # that can hang on huge expressions.
    return next((p for p in pred if isinstance(p, str)), "")


def _matches(gold: tuple, pred: list, timeout_s: int | None) -> bool:
    # verify() over all pairs, but a timeout raises instead of reading as "no match".
    # The other pairs still run: they are mostly cheap string comparisons.
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g, p in product(gold, pred):
        try:
            if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                return True
        except TimeoutException:
            timed_out = True
        except Exception:
            continue  # an uncomparable pair is just not a match
    if timed_out:
        raise _Timeout
    return False


def judge(completion: str, gold: str, *,
          timeout_s: int | None = DEFAULT_MV_TIMEOUT_S) -> tuple[str, str]:
    """(verdict, pred): verdict is one of VERDICTS, pred the extracted answer or ""."""
    from math_verify.errors import TimeoutException

    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)  # JSON golds may be numbers (amc23 stores 27.0)
    if not _is_clean_text(completion) or not _is_clean_text(gold):
        return "error", ""
    if threading.current_thread() is not threading.main_thread():
        timeout_s = None  # SIGALRM only works in the main thread; bound it from outside
    pred_str = ""
    try:
        pred = _parse(completion, _extraction_configs()[0], timeout_s, "first_match")
        if not pred:
            return "no_answer", ""
        pred_str = _pred_text(pred)
        gold_parsed = _parse_gold(gold, timeout_s)
        if not gold_parsed:
            return "error", pred_str  # the gold, not the completion, is at fault
        ok = _matches(gold_parsed, pred, timeout_s)
        return ("correct" if ok else "incorrect"), pred_str
    except _Timeout:
        return "timeout", pred_str
    except TimeoutException:  # an alarm landing outside math-verify's own handlers
        return "timeout", pred_str
    except Exception:
        return "error", pred_str


# ---------------------------------------------------------------- child process


def _limit_memory(max_bytes: int | None) -> None:
    if not max_bytes:
        return
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):
        pass  # not every platform allows it; the deadline still bounds time


def _child_loop(conn, timeout_s: int, max_bytes: int | None) -> None:
    # Runs in the child's main thread, where math-verify's SIGALRM timeouts work.
    _limit_memory(max_bytes)
    judge("$\\boxed{1}$", "1", timeout_s=timeout_s)  # compile math-verify's regexes now,
    conn.send("ready")  # not inside the first item's deadline
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        try:
            result = judge(*item, timeout_s=timeout_s)
        except BaseException:  # e.g. MemoryError or a stray alarm: keep serving
            result = ("error", "")
        conn.send(result)


def _context():
    # forkserver: safe in a threaded parent (Ray workers), and with math-verify
    # preloaded in the server a restart after a kill costs a fork (~10 ms), not an
    # import. "__main__" is preloaded too, else every child re-runs the parent's main
    # script (in a Ray worker: default_worker.py, which imports all of Ray).
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "actors.verifier", "math_verify"])
        return ctx
    return mp.get_context("spawn")


class Verifier:
    """One child process that judges items one at a time under a hard deadline.

    with Verifier(deadline_s=10) as v:
        results = v.judge_many([(completion, gold), ...])
    """

    def __init__(self, deadline_s: float = DEFAULT_DEADLINE_S,
                 mv_timeout_s: int = DEFAULT_MV_TIMEOUT_S,
                 start_timeout_s: float = 120.0,
                 max_memory_bytes: int | None = CHILD_MEMORY_BYTES):
        # math-verify's alarm must fire before the kill, or every slow item is a kill.
        self.mv_timeout_s = max(1, int(mv_timeout_s))
        self.deadline_s = float(deadline_s)
        self.start_timeout_s = start_timeout_s
        self.max_memory_bytes = max_memory_bytes
        self.restarts = 0  # kills and crashes, for stats
        self._proc = None
        self._conn = None

    def __enter__(self) -> "Verifier":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_loop, daemon=True,
            args=(child, self.mv_timeout_s, self.max_memory_bytes))
        self._proc.start()
        child.close()
        self._conn = parent
        # Wait for the import to finish so the first item's deadline is not eaten by it.
        try:
            ready = parent.poll(self.start_timeout_s) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._kill()
            raise RuntimeError("verifier child did not start (see its stderr)")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
            self._proc.join(timeout=2)
        except (OSError, ValueError):
            pass
        self._kill()

    def judge(self, completion: str, gold: str) -> tuple[str, str]:
        try:
            return self._ask((completion, gold))
        except BaseException:
            # An item may be in flight; its late answer must not be read as the next one's.
            self._kill()
            raise

    def _ask(self, item: tuple) -> tuple[str, str]:
        if self._proc is None:
            self._start()
        try:
            self._conn.send(item)
        except (OSError, EOFError):  # the child died while idle: a fresh one gets the item
            self._restart()
            self._conn.send(item)
        except Exception:  # unpicklable input; pickling fails before any byte is sent
            return "error", ""
        if not self._conn.poll(self.deadline_s):
            self._restart()
            return "timeout", ""
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # the child crashed on this item
            self._restart()
            return "error", ""

    def judge_many(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [self.judge(c, g) for c, g in pairs]


# ---------------------------------------------------------------- ray


def _shards(n: int, num: int) -> list[range]:
    num = max(1, min(num, n))
    bounds = [n * i // num for i in range(num + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(num)]


# A Ray task's fixed start (a worker, its Verifier's forkserver and child: ~2.5 CPU-s cold,
# and idle workers are often taken over by actors between stages) is paid back only by a
# few seconds of judging (~1.5-2.5 ms an item warm); below two tasks' worth the caller's
# own Verifier judges.
MIN_ITEMS_PER_TASK = 2048

_process_verifier: Verifier | None = None
_process_verifier_lock = threading.Lock()  # the driver's stages judge from several threads


def _verify_shard(pairs: list[tuple[str, str]], deadline_s: float) -> list[tuple[str, str]]:
    # One Verifier per process, kept across calls: its child's caches (math-verify
    # regexes, ANTLR's parse DFA, parsed golds) make a warm child faster per item than a
    # fresh one (MATH-500: ~2.5 vs ~4 ms CPU). An idle child exits when its parent does
    # (EOF on the pipe).
    global _process_verifier
    with _process_verifier_lock:
        if _process_verifier is None or _process_verifier.deadline_s != deadline_s:
            if _process_verifier is not None:
                _process_verifier.close()
            _process_verifier = Verifier(deadline_s=deadline_s)
        return _process_verifier.judge_many(pairs)


@functools.lru_cache(maxsize=1)
def _remote_shard():
    import ray  # only the Ray path needs it

    return ray.remote(num_cpus=1)(_verify_shard)


def verify_with_ray(completions: list[str], golds: list[str], num_tasks: int,
                    deadline_s: float = DEFAULT_DEADLINE_S,
                    min_items_per_task: int = MIN_ITEMS_PER_TASK) -> list[tuple[str, str]]:
    """Judge completions[i] against golds[i]; input order kept. At most `num_tasks` Ray
    tasks of at least `min_items_per_task` items each; a batch smaller than two tasks'
    worth is judged here, by this process's own Verifier.

    The Ray path assumes Ray is initialised by the caller."""
    if len(completions) != len(golds):
        raise ValueError("completions and golds differ in length")
    if not completions:
        return []
    pairs = list(zip(completions, golds))
    tasks = min(num_tasks, len(pairs) // max(1, min_items_per_task))
    if tasks < 2:
        return _verify_shard(pairs, deadline_s)
    import ray

    remote = _remote_shard()
    refs = [remote.remote([pairs[i] for i in r], deadline_s) for r in _shards(len(pairs), tasks)]
    return [res for shard in ray.get(refs) for res in shard]
