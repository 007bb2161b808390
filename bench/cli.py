"""The `ocl-bench` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from bench.errors import UserError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from bench.registry import registry

    reg = registry()
    if args.action == "show":
        if not args.name:
            raise UserError("usage: ocl-bench plugins show NAME")
        found = reg.find(args.name)
        if not found:
            known = ", ".join(sorted({i.name for i in reg.infos}))
            raise UserError(f"unknown plugin '{args.name}'; known plugins: {known}")
        for info in found:
            d = info.as_dict()
            if args.json:
                print(json.dumps(d, indent=2, default=str))
                continue
            print(f"{d['kind']} '{d['name']}' from {d['distribution']} {d['version']}")
            if info.broken:
                print(f"BROKEN: {info.error}")
                continue
            print(d["summary"])
            rows = [[k, v["type"], json.dumps(v["default"]), v["doc"]] for k, v in d["params"].items()]
            print(tabulate(rows, headers=["param", "type", "default", "doc"]) if rows else "(no params)")
        return 0
    if args.action is not None:
        raise UserError(f"unknown action '{args.action}'; use 'ocl-bench plugins show NAME'")
    rows = [i.as_dict() for i in reg.infos]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = [
        [r["kind"], r["name"], r["distribution"], f"BROKEN: {r['error']}" if r["broken"] else r["summary"]]
        for r in rows
    ]
    print(tabulate(table, headers=["kind", "name", "distribution", "summary"]))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bench.config import load_config
    from bench.evaluate import evaluate
    from bench.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, Path(args.out), progress=not args.quiet)
    if args.no_eval:
        return 0
    from bench.evaluate import load_run

    cfg, model, step = load_run(args.out)
    metrics = evaluate(cfg, model, Path(args.out), step, progress=not args.quiet)
    _print_metrics(metrics, f"trained {result.step} steps in {result.seconds:.1f}s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from bench.evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.overrides, progress=not args.quiet)
    _print_metrics(metrics, f"evaluated step {metrics['step']}")
    return 0


def _print_metrics(metrics: dict, header: str) -> None:
    print(header)
    rows = [
        [r["task"], r["masks"] or "", r["metric"], f"{r['value']:.4f}", r["num_images"]]
        for r in metrics["records"]
    ]
    print(tabulate(rows, headers=["task", "masks", "metric", "value", "images"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, or show one's params")
    p.add_argument("action", nargs="?", choices=None, help="'show'")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("train", help="train a run (and evaluate it)")
    p.add_argument("config", nargs="?", help="run config TOML (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides of eval/tasks settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    return parser


def _split_config(args: argparse.Namespace) -> None:
    """`train a.b=1` parses 'a.b=1' as the config path; move it to the overrides."""
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not Path(cfg).exists():
        args.overrides = [cfg, *args.overrides]
        args.config = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`eval RUN -q a.b=1`); argparse leaves those over.
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _split_config(args)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"ocl-bench: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("ocl-bench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
