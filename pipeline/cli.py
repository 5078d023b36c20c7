"""verifine command line.

  verifine run [CONFIG] [--stages S ...] [--force S ...] [key=value ...]
  verifine prompts|sample|verify|reference|train|eval [CONFIG] [key=value ...]
  verifine status RUN_DIR
  verifine report RUN_DIR

No CONFIG: the embedded toy default (configs/toy.yaml). Stage names select a whole
family: `train` is every train/<objective>, `eval` every eval/<model>/<benchmark>.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time

import yaml

from pipeline.config import Config, ConfigError, load_config
from pipeline.runner import StagesFailed
from pipeline.sources import SourceError

# The stage families, upstream first (one sub-command each, but report).
STAGE_ORDER = ("prompts", "sample", "verify", "reference", "train", "eval", "report")

RESOLVED_CONFIG = "config.yaml"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if items and "=" not in items[0]:
        config, items = items[0], items[1:]
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {bad[0]!r}")
    return config, items


def _match(stage_names: list[str], wanted: list[str]) -> set[str]:
    out = set()
    for w in wanted:
        hits = {n for n in stage_names if n == w or n.startswith(w.rstrip("/") + "/")}
        if not hits:
            raise ConfigError(f"no stage named {w!r}; stages: {', '.join(stage_names)}")
        out |= hits
    return out


def run_pipeline(cfg: Config, stages: list[str] = (), force: list[str] = ()) -> dict:
    from actors.store import RunStore
    from pipeline.engine_pool import keeping_engines
    from pipeline.plan import build_stages, registry_path
    from pipeline.preflight import check_inputs
    from pipeline.ray_session import check_shared_storage, connect
    from pipeline.runner import run_stages

    check_inputs(cfg, registry_path(cfg))  # user errors surface before Ray starts
    plan = build_stages(cfg)
    names = [s.name for s in plan]
    only, forced = _match(names, list(stages)) if stages else None, _match(names, list(force))
    store = RunStore(cfg.run.dir)
    log(f"run directory {store.uri}")
    connect(cfg.ray.address, cfg.ray.num_cpus, log=log, worker_resource=cfg.ray.worker_resource)
    check_shared_storage(cfg.run.dir)
    store.write_bytes(RESOLVED_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    with keeping_engines():  # one engine start-up serves several stages' sampling
        return run_stages(store, plan, only=only, force=forced, log=log, max_parallel=cfg.ray.max_parallel_stages)


def load_run_config(store) -> Config:
    """The resolved config a run directory was last run with."""
    from pipeline.config import config_from_dict

    if not store.exists(RESOLVED_CONFIG):
        raise ConfigError(f"{store.uri} has no {RESOLVED_CONFIG}: not a verifine run directory")
    return config_from_dict(yaml.safe_load(store.read_bytes(RESOLVED_CONFIG)), store.full_uri(RESOLVED_CONFIG))


def _open_run(run_dir: str):
    from actors.store import RunStore
    from pipeline.plan import build_stages

    store = RunStore(run_dir, create=False)
    if not store.exists(RESOLVED_CONFIG):
        raise ConfigError(f"{run_dir}: not a verifine run directory (no {RESOLVED_CONFIG})")
    cfg = load_run_config(store)
    return store, cfg, build_stages(cfg)


def status_table(run_dir: str) -> str:
    """Every stage of the run's configuration: done (files present with their recorded
    sizes), stale (made under another identity, or an input is not done), missing, or
    broken (a done stage whose files are gone or changed size)."""
    from pipeline.manifests import read_manifest
    from pipeline.runner import stage_states

    store, _, plan = _open_run(run_dir)
    states = stage_states(store, plan)
    rows = [("stage", "state", "rows", "finished", "identity")]
    for s in plan:
        m = read_manifest(store, s.name) or {}
        state, ident = states[s.name]
        complete = m.get("status") == "complete"
        when = (datetime.datetime.fromtimestamp(m["finished"]).strftime("%Y-%m-%d %H:%M:%S")
                if complete and m.get("finished") else "-")
        rows.append((s.name, state, str(m.get("rows", "-")) if complete else "-", when,
                     ident or "(inputs not done)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def rebuild_report(run_dir: str) -> str:
    """`verifine report RUN_DIR`: the report from the stages that are done under the run's
    configuration; eval stages that are not are named in it, never mixed in."""
    from pipeline.external import base_model_source
    from pipeline.manifests import read_manifest
    from pipeline.ray_session import connect
    from pipeline.report import write_report
    from pipeline.runner import ConfigView, stage_states

    store, cfg, plan = _open_run(run_dir)
    report_stage = next((s for s in plan if s.name == "report"), None)
    if report_stage is None:
        raise ConfigError(f"{run_dir}: its configuration evaluates nothing, so there is no report")
    states = stage_states(store, plan)
    done = {i: read_manifest(store, i) for i in report_stage.inputs if states[i][0] == "done"}
    excluded = [f"{i} ({states[i][0]})" for i in report_stage.inputs if i not in done]
    for name in excluded:
        log(f"  left out of the report: {name}")
    connect(cfg.ray.address, cfg.ray.num_cpus, log=log, worker_resource=cfg.ray.worker_resource)
    base = base_model_source(report_stage.external["base_model"], store, log)
    write_report(store, "report/rebuilt", done, ConfigView(report_stage.config, "report"), base, log, excluded,
                 stable_copy=False)  # the report stage's own files stay as its manifest records them
    return store.full_uri("report", "rebuilt", "report.md")


def _names(values: list[str]) -> list[str]:
    return [n for v in values for n in v.split(",") if n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verifine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the pipeline (default: the toy task)")
    p_run.add_argument("--stages", action="append", default=[],
                       help="run only these stages (comma-separated or repeated; missing inputs run first)")
    p_run.add_argument("--force", action="append", default=[],
                       help="re-run these stages and their dependents (comma-separated or repeated)")
    p_run.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    for stage in STAGE_ORDER[:-1]:
        p = sub.add_parser(stage, help=f"run the {stage} stage (and whatever it needs)")
        p.add_argument("--force", action="store_true", help=f"re-run {stage} even if it is done")
        p.add_argument("args", nargs="*", help="[CONFIG] [key=value ...]")
    p_status = sub.add_parser("status", help="table of stages in a run directory")
    p_status.add_argument("run_dir")
    p_report = sub.add_parser("report", help="rebuild report.md/json/png from stored results")
    p_report.add_argument("run_dir")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    args, extra = parser.parse_known_args(argv)
    if any(e.startswith("-") for e in extra) or (extra and not hasattr(args, "args")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides written after an option: `verifine run --force train x.y=1`
        args.args += extra
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        if args.command == "status":
            print(status_table(args.run_dir))
            return 0
        if args.command == "report":
            path = rebuild_report(args.run_dir)
            log(f"report written to {path}")
            return 0
        config, overrides = _split_config_and_overrides(args.args)
        cfg = load_config(config, overrides)
        try:
            if args.command == "run":
                outcome = run_pipeline(cfg, _names(args.stages), _names(args.force))
            else:
                outcome = run_pipeline(cfg, [args.command], [args.command] if args.force else [])
        except StagesFailed as e:  # the other branches ran; name what did not
            print(f"verifine: {e}", file=sys.stderr)
            return 1
        ran = [k for k, v in outcome.items() if v == "ran"]
        log(f"finished: {len(ran)} stage(s) ran, {len(outcome) - len(ran)} cached; run directory {cfg.run.dir}")
        return 0
    except (ConfigError, SourceError) as e:  # the user's to fix: one line, a traceback only with --debug
        if args.debug:
            raise
        print(f"verifine: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a clear last line for `ray job logs`; the traceback stays above it
        import traceback

        traceback.print_exc()
        print(f"verifine: {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
