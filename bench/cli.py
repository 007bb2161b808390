"""The `ocl-bench` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ocl_bench.api.errors import UserError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ocl_bench.run.registry import registry

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
            rows = [
                [k, v["type"], json.dumps(v["default"]), v.get("range") or "", v["doc"]]
                for k, v in d["params"].items()
            ]
            print(
                tabulate(rows, headers=["param", "type", "default", "range", "doc"])
                if rows
                else "(no params)"
            )
        return 0
    if args.action is not None:
        raise UserError(f"unknown action '{args.action}'; use 'ocl-bench plugins show NAME'")
    rows = [i.as_dict() for i in reg.infos]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = [
        [
            r["kind"],
            r["name"],
            r["distribution"],
            f"BROKEN: {r['error']}" if r["broken"] else r["summary"],
        ]
        for r in rows
    ]
    print(tabulate(table, headers=["kind", "name", "distribution", "summary"]))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ocl_bench.run import distributed
    from ocl_bench.run.config import load_config
    from ocl_bench.run.evaluate import evaluate
    from ocl_bench.run.train import train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, Path(args.out), progress=not args.quiet)
    finally:
        distributed.teardown()
    if args.no_eval or not distributed.current().main:
        return 0
    from ocl_bench.run.evaluate import load_run

    cfg, model, step = load_run(args.out)
    metrics = evaluate(cfg, model, Path(args.out), step, progress=not args.quiet)
    _print_metrics(metrics, f"trained {result.step} steps in {result.seconds:.1f}s")
    return 0


# Options that only a submitit job reads (refused with the local executor).
_JOB_OPTIONS = ("gpus", "nodes", "cpus_per_task", "mem_gb", "sbatch", "partition", "cluster")


def _job_settings(args: argparse.Namespace, grid: Any) -> dict[str, Any]:
    """What each cell's submitit job asks for: --gpus/--nodes/--cpus-per-task, else the
    grid file's, and the other job options."""
    if args.executor != "submitit":
        given = [f"--{k.replace('_', '-')}" for k in _JOB_OPTIONS if getattr(args, k)]
        if given:
            raise UserError(
                f"{' and '.join(given)} need --executor submitit (`--executor submitit --cluster"
                " local` runs the jobs on this machine)"
            )
        if grid.gpus or grid.nodes > 1:
            print(
                f"note: the grid's gpus = {grid.gpus}, nodes = {grid.nodes} apply to"
                " --executor submitit; here each cell runs in one process",
                file=sys.stderr,
            )
        return {"time": args.time}
    slurm: dict[str, Any] = {
        "partition": args.partition,
        "time": args.time,
        "mem_gb": args.mem_gb,
        "timeout_requeues": args.timeout_requeues,
        "sbatch": dict(args.sbatch or []),
    }
    for key in ("gpus", "nodes", "cpus_per_task"):  # the command line wins over the file
        slurm[key] = getattr(grid, key) if getattr(args, key) is None else getattr(args, key)
    if args.cluster:
        slurm["cluster"] = args.cluster
    return slurm


def _cmd_presets(args: argparse.Namespace) -> int:
    from ocl_bench.run.config import preset_names, preset_summary

    rows = [[name, preset_summary(name)] for name in preset_names()]
    print(tabulate(rows, headers=["preset", "summary"]))
    return 0


def _cmd_protocols(args: argparse.Namespace) -> int:
    from ocl_bench.run.protocol import load_protocol, protocol_names

    if args.name is None:
        rows = []
        for name in protocol_names():
            protocol = load_protocol(name)
            rows.append([name, ", ".join(protocol.datasets), protocol.summary])
        print(tabulate(rows, headers=["protocol", "datasets", "summary"]))
        return 0
    protocol = load_protocol(args.name)
    print(f"{protocol.name}: {protocol.summary}")
    if protocol.follows:
        print(f"follows: {protocol.follows}")
    if protocol.test:
        print(f"checked by: {protocol.test}")
    for ds, rules in protocol.datasets.items():
        print(f"\n[{ds}]" + (f"  follows: {rules.follows}" if rules.follows else ""))
        for key, value in rules.dataset.items():
            print(f"  dataset.{key} = {json.dumps(value)}")
        for task, values in rules.tasks.items():
            for key, value in values.items():
                print(f"  tasks.{task}.{key} = {json.dumps(value)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ocl_bench.run.evaluate import evaluate_run

    metrics = evaluate_run(
        args.run_dir, args.overrides, progress=not args.quiet, protocol=args.protocol
    )
    under = f" under protocol {metrics['protocol'] or 'none'}" if args.protocol is not None else ""
    _print_metrics(metrics, f"evaluated step {metrics['step']}{under}")
    return 0


# Options of the first import command (it read one format), kept as the overrides they mean.
IMPORT_OPTION_OVERRIDES = {
    "encoder": "encoder.name",
    "num_slots": "grouping.num_slots",
    "num_heads": "decoder.num_heads",
    "eval_order": "decoder.eval_order",
}


def _cmd_import(args: argparse.Namespace) -> int:
    from ocl_bench.run.importing import import_checkpoint
    from ocl_bench.run.registry import registry

    importers = [i for i in registry().infos if i.kind == "importer"]
    if args.list:
        rows = [[i.name, i.distribution, i.version, i.cls.summary()] for i in importers]
        print(tabulate(rows, headers=["format", "distribution", "version", "reads"]))
        return 0
    if not args.format or not args.path or not args.out:
        known = ", ".join(i.name for i in importers) or "(none installed)"
        raise UserError(
            f"usage: ocl-bench import FORMAT PATH --out RUN_DIR [overrides]; formats: {known}"
        )
    leading = [
        f"{key}={getattr(args, option)}"
        for option, key in IMPORT_OPTION_OVERRIDES.items()
        if getattr(args, option) is not None
    ]
    result = import_checkpoint(args.format, args.path, args.out, [*leading, *args.overrides])
    print(f"imported {result.summary} into {args.out}; evaluate with `ocl-bench eval {args.out}`")
    for note in result.notes:
        print(f"  {note}")
    return 0


DEFAULT_DB = "runs/results.sqlite"
DB_HELP = (
    "results database: an SQLite file, or postgresql://user@host/dbname shared by many hosts"
    f" (default: $OCL_BENCH_DB, else {DEFAULT_DB})"
)


def _default_db() -> str:
    """--db when none is given: $OCL_BENCH_DB (a lab's one database for every command),
    else the local file."""
    return os.environ.get("OCL_BENCH_DB") or DEFAULT_DB


def _no_file(db: str, kind: str = "exists") -> bool:
    """Whether --db names a file that is not there (a server URL is checked on opening)."""
    return "://" not in db and not getattr(Path(db), kind)()


def _cmd_grid(args: argparse.Namespace) -> int:
    import signal

    from ocl_bench.report.leaderboard import load_leaderboard
    from ocl_bench.report.render import render
    from ocl_bench.run.grid import (
        RUNNING_ELSEWHERE,
        check_jobs,
        load_grid,
        run_grid,
        status_detail,
    )
    from ocl_bench.run.store import ResultStore

    grid = load_grid(args.grid, args.overrides, args.seeds)
    db, runs = args.db, Path(args.runs)  # db: a path or a URL (Path would mangle a URL)
    where = ResultStore(db).where  # an unusable --db fails here, before anything runs
    slurm = _job_settings(args, grid)
    check_jobs(grid, args.executor, slurm)  # before anything prints
    print(f"grid '{grid.name}': {len(grid.cells)} cells -> {where}", file=sys.stderr)
    display, bars = _grid_display(args, grid, db)
    # A job stopped by its scheduler (SIGTERM) releases its cells' leases on the way out.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with display:
            statuses = run_grid(
                grid,
                db,
                runs,
                args.workers or grid.workers,
                args.executor,
                slurm,
                bars,
                wait=args.wait,
                lease_timeout=args.lease_timeout,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    store = ResultStore(db)
    for cell in grid.cells:
        status = statuses[cell.label]
        print(f"  {status:20s} {cell.label}", file=sys.stderr)
        detail = status_detail(store, cell, status)
        if detail:
            print(f"  {'':20s}   {detail}", file=sys.stderr)
    elsewhere = sum(s == RUNNING_ELSEWHERE for s in statuses.values())
    if elsewhere:
        print(
            f"{elsewhere} cell(s) are running in other processes; rerun later, or pass --wait",
            file=sys.stderr,
        )
    if args.grid is None or args.leaderboard:
        from ocl_bench.run.grid import demo_grid_path

        board = load_leaderboard(args.grid or demo_grid_path(), db, overrides=args.overrides)
        print(render(board, "md"))
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


def _grid_display(args: argparse.Namespace, grid: Any, db: str) -> tuple[Any, bool]:
    """The grid's one progress display when its cells run in other processes (workers,
    submitit jobs: they report through the store), and whether run_grid still draws its
    own progress (one process: its progress bars)."""
    import contextlib

    from ocl_bench.run.grid_status import GridProgress

    workers = args.workers or grid.workers
    if args.quiet or (workers <= 1 and args.executor != "submitit"):
        return contextlib.nullcontext(), not args.quiet
    cells = {c.config.digest(): (c.label, c.config.train.steps) for c in grid.cells}
    lanes = workers if args.executor == "local" else 0  # jobs: as many as are running
    return GridProgress(db, grid.name, cells, lanes), False


def _cmd_compare(args: argparse.Namespace) -> int:
    from ocl_bench.report.compare import compare_rows
    from ocl_bench.run.store import ResultStore

    if _no_file(args.db, "is_file"):
        raise UserError(f"results database not found: {args.db}")
    task, _, metric = (args.metric or "").rpartition(".")
    found = compare_rows(
        ResultStore(args.db), args.row_a, args.row_b, task or None, metric or None, args.masks
    )
    print(json.dumps(found.as_dict(), indent=2) if args.json else found.text())
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from ocl_bench.run.store import ResultStore

    if _no_file(args.db):
        raise UserError(f"results database not found: {args.db}")
    store = ResultStore(args.db)
    if args.export:
        from ocl_bench.run.store_copy import copy_store

        target = ResultStore(args.export)
        print(copy_store(store, target).line(store.where, target.where))
        return 0
    cells = store.cells()
    if args.json:
        print(json.dumps([c.__dict__ for c in cells], indent=2, default=str))
        return 0
    live = {lease.config_hash: lease for lease in store.leases(live=True)}
    headers = ["config", "grid", "cell", "dataset", "protocol", "status", "headline (dec)"]
    print(tabulate([_result_row(c, live) for c in cells], headers=[*headers, "error"]))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from ocl_bench.run.grid_status import status_report
    from ocl_bench.run.store import ResultStore

    if _no_file(args.db):
        raise UserError(f"results database not found: {args.db}")
    print("\n".join(status_report(ResultStore(args.db))))
    return 0


def _result_row(c: Any, live: dict[str, Any]) -> list[str]:
    """One stored cell as `ocl-bench results` lists it."""
    import time

    from ocl_bench.report.compare import headline_of
    from ocl_bench.run.protocol import stored_protocol
    from ocl_bench.run.registry import registry

    headline = headline_of(c)
    shown = ""
    if headline is not None:
        # decoder masks where the task scores masks (what SPOT and DINOSAUR report)
        masks = "decoder" if registry().get("task", headline[0]).scores_masks else None
        value = c.value(*headline, masks)
        shown = "" if value is None else f"{headline[1]} {value:.3f}"
    status = c.status
    if c.status == "running":  # a running row without a live lease was interrupted
        held = live.get(c.config_hash)
        alive = held is not None and held.expired(time.time()) is None
        status = f"running ({held.host}, pid {held.pid})" if alive else "interrupted"
    return [
        c.config_hash,
        c.grid or "",
        c.label or "",
        c.dataset,
        stored_protocol(c.config),
        status,
        shown,
        (c.error_line or "")[:100],
    ]


def _cmd_slot_library(args: argparse.Namespace) -> int:
    from ocl_bench.run.slot_library import build_library

    library = build_library(
        args.run_dir,
        args.centroids,
        batch_size=args.batch,
        epochs=args.epochs,
        split=args.split,
        seed=args.seed,
        init=args.init,
        max_images=args.max_images,
        device=args.device,
        progress=not args.quiet,
    )
    p = library.provenance
    print(
        f"{p['centroids']} centroids of {p['slots']} slots ({p['images']} {p['split']} images,"
        f" mean squared distance {p['mean_squared_distance']:.4g}, {p['used_centroids']} used)"
        f" -> {library.path}"
    )
    return 0


def _cmd_generate_dataset(args: argparse.Namespace) -> int:
    from ocl_bench.datasets.generated.generate import Recipe, build
    from ocl_bench.datasets.generated.pseudo_masks import RefineSettings
    from ocl_bench.run.config import parse_override

    source_params = {}
    for text in args.overrides:
        path, value = parse_override(text)
        source_params[".".join(path)] = value
    try:
        refine = RefineSettings(
            fg_threshold=args.fg_threshold,
            ignore_threshold=args.ignore_threshold,
            aggregate=args.aggregate,
        )
    except ValueError as err:
        from ocl_bench.api.errors import ConfigError

        raise ConfigError(str(err)) from None
    recipe = Recipe(
        source=args.source,
        source_params=source_params,
        split=args.split,
        captions=args.captions,
        count=args.count,
        image_size=args.image_size,
        pretrained=args.pretrained or "",
        tiny=args.tiny,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        refine=refine,
        blip2=args.blip2 or "",
    )
    made = build(Path(args.out), recipe, progress=not args.quiet)
    print(f"{made} new items -> {args.out} (dataset.name=generated dataset.root={args.out})")
    if args.preview:
        from ocl_bench.datasets.generated.generate import preview

        figure = preview(Path(args.out), args.preview)
        if figure is not None:
            print(f"preview: {figure}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from ocl_bench.report.leaderboard import list_leaderboards, load_leaderboard
    from ocl_bench.report.render import render

    db = args.db  # a path or a URL
    if args.list or not args.name:
        rows = []
        for path in list_leaderboards():
            board = load_leaderboard(path, db)
            rows.append([path.stem, board.title[:60], f"{board.runnable}/{len(board.rows)}"])
        print(tabulate(rows, headers=["leaderboard", "title", "runnable rows"]))
        return 0
    board = load_leaderboard(args.name, db, args.dataset, args.overrides)
    print(render(board, args.format))
    return 0


def _cmd_figure(args: argparse.Namespace) -> int:
    from ocl_bench.report.board_figures import write_board_figure
    from ocl_bench.report.leaderboard import load_leaderboard

    board = load_leaderboard(args.name, args.db, overrides=args.overrides)
    if board.figure and _no_file(args.db, "is_file"):  # a board without one says so first
        raise UserError(f"results database not found: {args.db}")
    drawn = write_board_figure(board, Path(args.out))
    if args.json:
        print(json.dumps(drawn.as_dict(), indent=2))
        return 0
    print(f"{board.name}: {len(drawn.points)} measured values drawn -> {drawn.path}")
    for line in drawn.missing:
        print(f"  not drawn: {line}")
    return 0


def _print_metrics(metrics: dict, header: str) -> None:
    print(header)
    rows = [
        [r["task"], r["masks"] or "", r["metric"], f"{r['value']:.4f}", r["num_images"]]
        for r in metrics["records"]
    ]
    print(tabulate(rows, headers=["task", "masks", "metric", "value", "images"]))


def _number(kind: type, low: float = 0, *, above: bool = True) -> Callable[[str], Any]:
    """An argparse type for a `kind` number above `low` (at least `low` with above=False);
    argparse's own error otherwise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            article = "an" if kind is int else "a"
            raise argparse.ArgumentTypeError(f"not {article} {kind.__name__}: '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < low or (above and value == low):
            bound = ("positive" if low == 0 else f"above {low}") if above else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


# What build_parser hands each group of subcommands to add its parser to.
Subparsers = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # in this order in `ocl-bench --help`
    _add_run_commands(sub)
    _add_import(sub)
    _add_grid(sub)
    _add_result_commands(sub)
    _add_slot_library(sub)
    _add_generate_dataset(sub)
    _add_board_commands(sub)
    return parser


def _add_run_commands(sub: Subparsers) -> None:
    """plugins, train, presets, protocols and eval."""
    p = sub.add_parser("plugins", help="list installed plugins, or show one's params")
    p.add_argument("action", nargs="?", choices=None, help="'show'")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("train", help="train a run (and evaluate it)")
    p.add_argument(
        "config",
        nargs="?",
        help="run config TOML or preset name (see `ocl-bench presets`; default: the embedded demo)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("presets", help="list the named run configs (official hyperparameters)")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("protocols", help="list the evaluation protocols, or show one's settings")
    p.add_argument("name", nargs="?", help="a protocol to show")
    p.set_defaults(func=_cmd_protocols)

    p = sub.add_parser("eval", help="evaluate a run directory")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides of eval/tasks settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--protocol",
        default=None,
        help="re-score the run under this evaluation protocol ('' = none) into"
        " RUN/protocols/NAME/, leaving the run's own metrics.json as it is",
    )
    p.set_defaults(func=_cmd_eval)


def _add_import(sub: Subparsers) -> None:
    p = sub.add_parser("import", help="turn another code base's checkpoint into a run directory")
    p.add_argument("format", nargs="?", help="checkpoint format: an importer plugin (see --list)")
    p.add_argument("path", nargs="?", help="the checkpoint file")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted run-config overrides, e.g. dataset.name=coco grouping.num_slots=7; "
        "importer.KEY=VALUE sets the importer's params (ocl-bench plugins show FORMAT)",
    )
    p.add_argument("--out", help="new run directory (must not exist, or be empty)")
    p.add_argument("--list", action="store_true", help="list the formats and their distribution")
    for option in IMPORT_OPTION_OVERRIDES:  # hidden: the overrides say the same
        p.add_argument(f"--{option.replace('_', '-')}", dest=option, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_import)


def _add_grid(sub: Subparsers) -> None:
    p = sub.add_parser("grid", help="run an ablation grid into the results database")
    p.add_argument(
        "grid",
        nargs="?",
        help="grid TOML, or a leaderboard name to run its buildable rows"
        " (default: leaderboards/shapes-demo.toml)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides applied to the grid's base (to a leaderboard's rows, last)",
    )
    p.add_argument("--db", default=_default_db(), help=DB_HELP)
    p.add_argument("--runs", default="runs", help="where cell run directories go")
    p.add_argument(
        "--workers",
        type=_number(int),
        default=None,
        help="local worker processes (>= 1; default: the grid file's `workers`, else 1)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for cells another process is running instead of skipping them",
    )
    p.add_argument(
        "--lease-timeout",
        type=_number(float),
        default=300.0,
        metavar="SECONDS",
        help="take over a cell whose runner sent no heartbeat for this long",
    )
    _add_executor_options(p)
    p.add_argument(
        "--seeds",
        type=_number(int),
        metavar="N",
        help="run each cell with N seeds (the config's seed and the next N-1; replaces the"
        " file's `seeds`); stored seeds are not rerun",
    )
    p.add_argument("--leaderboard", action="store_true", help="print the grid's leaderboard")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_grid)


def _add_executor_options(p: argparse.ArgumentParser) -> None:
    """Where `grid` runs its cells: here, or as Slurm jobs through submitit."""
    p.add_argument("--executor", choices=["local", "submitit"], default="local")
    p.add_argument("--partition", help="Slurm partition (submitit)")
    p.add_argument("--time", type=_number(int), default=60, help="Slurm time limit in minutes")
    p.add_argument(
        "--gpus",
        type=_number(int, 0, above=False),
        default=None,
        metavar="G",
        help="GPUs per node of each cell's job, one process each, all in one process group"
        " (default: the grid file's `gpus`, else 0: one CPU process per node)",
    )
    p.add_argument(
        "--nodes",
        type=_number(int, 1, above=False),
        default=None,
        metavar="N",
        help="nodes of each cell's job (default: the grid file's `nodes`, else 1)",
    )
    p.add_argument(
        "--cpus-per-task",
        type=_number(int, 1, above=False),
        default=None,
        metavar="C",
        help="CPUs of each process, for its DataLoader workers (default: the grid file's"
        " `cpus_per_task`, else the cluster's default)",
    )
    p.add_argument(
        "--mem-gb",
        type=_number(float, 0, above=False),
        metavar="M",
        help="memory per node in GB (default: the cluster's)",
    )
    p.add_argument(
        "--timeout-requeues",
        type=_number(int, 0, above=False),
        default=3,
        metavar="K",
        help="how often a cell's job that reaches --time is requeued (default 3, submitit's);"
        " a preempted job is requeued however often it is preempted",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        type=_sbatch_option,
        metavar="NAME=VALUE",
        help="any other sbatch option submitit knows, repeatable: --sbatch account=lab"
        " --sbatch qos=high --sbatch constraint=a100 (a bare NAME is a flag: exclusive)",
    )
    p.add_argument("--cluster", help="submitit cluster override ('local' runs jobs locally)")


def _sbatch_option(text: str) -> tuple[str, str | bool]:
    """NAME=VALUE (or a bare NAME, a flag) as submitit's slurm_NAME parameter takes it."""
    name, eq, value = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not name or (eq and not value):
        raise argparse.ArgumentTypeError(f"'{text}': give NAME=VALUE, or NAME for a flag")
    return name, value if eq else True


def _add_result_commands(sub: Subparsers) -> None:
    """results, status and compare: reading the results database."""
    p = sub.add_parser("results", help="list the cells stored in the results database")
    p.add_argument("--db", default=_default_db(), help=DB_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--export",
        metavar="DB",
        help="copy the cells, metrics, per-image values and lease history into another store"
        " (a file or postgresql:// URL; a merge: rerunning copies nothing twice)",
    )
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser(
        "status",
        help="the running cells: host, pid or Slurm job, step, seconds per step, heartbeat age",
    )
    p.add_argument("--db", default=_default_db(), help=DB_HELP)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "compare",
        help="paired difference of two stored rows over their shared seeds: paired t interval,"
        " p-value, verdict (3+ seeds) and the seeds a difference of that size needs",
    )
    p.add_argument("db", help="results database")
    p.add_argument("row_a", help="a config-hash prefix or a cell label (all its seeds)")
    p.add_argument("row_b", help="the row A is compared with")
    p.add_argument(
        "--metric",
        default=None,
        help="TASK.METRIC, or a metric one of the rows' tasks declares (default: the rows'"
        " first headline metric, object discovery's fg_ari for the demo)",
    )
    p.add_argument("--masks", default=None, help="decoder or attn (default: decoder if stored)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compare)


def _add_slot_library(sub: Subparsers) -> None:
    p = sub.add_parser(
        "slot-library", help="k-means centroids of a run's slots (a slot library for generation)"
    )
    p.add_argument("run_dir")
    p.add_argument("--centroids", type=int, required=True, help="number of centroids K")
    p.add_argument("--batch", type=int, default=1024, help="slots per k-means batch")
    p.add_argument("--epochs", type=int, default=3, help="passes over the slots")
    p.add_argument("--split", default="train", help="split whose slots are clustered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="k-means++", help="'k-means++' or 'random'")
    p.add_argument("--max-images", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--device", help="where slots are extracted (default: the run's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_slot_library)


def _add_generate_dataset(sub: Subparsers) -> None:
    p = sub.add_parser(
        "generate-dataset",
        help="images generated from a dataset's prompts + diffusion pseudo masks (resumable)",
    )
    p.add_argument("out", help="folder to write (rerun to resume)")
    p.add_argument("overrides", nargs="*", help="params of the source dataset, KEY=VALUE")
    p.add_argument("--source", default="shapes", help="dataset plugin giving the prompts")
    p.add_argument("--split", default="train", help="split of the source dataset")
    p.add_argument("--captions", default="dataset", choices=["dataset", "class_names", "blip2"])
    p.add_argument("--count", type=int, default=0, help="images (0 = one per source image)")
    p.add_argument("--pretrained", help="local Stable Diffusion folder (else $OCL_BENCH_SD)")
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU, seconds)")
    p.add_argument("--blip2", help="local BLIP-2 folder for --captions blip2")
    p.add_argument("--image-size", type=int, default=0, help="0 = the model's / the source's")
    p.add_argument("--steps", type=int, default=50, help="DPM-Solver steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="item i uses seed + i")
    p.add_argument("--fg-threshold", type=float, default=0.6)
    p.add_argument("--ignore-threshold", type=float, default=0.5)
    p.add_argument("--aggregate", default="mean", choices=["single", "mean"])
    p.add_argument(
        "--preview", type=int, default=8, help="images in OUT/preview.png, with masks (0: none)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate_dataset)


def _add_board_commands(sub: Subparsers) -> None:
    """leaderboard and figure: published numbers beside measured ones."""
    p = sub.add_parser("leaderboard", help="published vs measured tables")
    p.add_argument("name", nargs="?", help="leaderboard name (see --list)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="the overrides its cells were run with (`ocl-bench grid NAME overrides...`)",
    )
    p.add_argument("--list", action="store_true", help="list leaderboards and runnable rows")
    p.add_argument("--db", default=_default_db(), help=DB_HELP)
    p.add_argument("--dataset", help="only the columns of this dataset")
    p.add_argument("--format", choices=["md", "csv", "html", "json"], default="md")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("figure", help="draw a board's [figure] from its measured results")
    p.add_argument("name", help="a leaderboard with a [figure] table")
    p.add_argument(
        "overrides",
        nargs="*",
        help="the overrides its cells were run with (`ocl-bench grid NAME overrides...`)",
    )
    p.add_argument("--db", default=_default_db(), help=DB_HELP)
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--json", action="store_true", help="print the drawn values as JSON")
    p.set_defaults(func=_cmd_figure)


def _split_config(args: argparse.Namespace) -> None:
    """`train a.b=1` parses 'a.b=1' as the config path; move it to the overrides."""
    for attr in ("config", "grid"):
        value = getattr(args, attr, None)
        if value is not None and "=" in value and not Path(value).exists():
            args.overrides = [value, *args.overrides]
            setattr(args, attr, None)


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
