"""Analysis commands: ``results`` (one row per run, as a table, CSV or Parquet) and ``report`` (the
comparison with the baseline as a dashboard and in MLflow)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from mta_lab.cli import common
from mta_lab.sweep.spec import Profile


def register(commands) -> None:
    results = commands.add_parser(
        "results",
        help="a sweep's runs: one row each, with the params that vary, metrics and cost",
        description="Read a sweep's runs from MLflow into one row per run: the config params that differ, "
        "the final value of every metric, the best value of the sweep's metric, tokens/s, peak memory, "
        "wall time and parameters. --stats prints the comparison with the baseline instead.",
    )
    _add_sweep_arguments(results)
    results.add_argument(
        "--format", choices=["table", "csv", "parquet"], default="table", help="default: table"
    )
    results.add_argument("--out", type=Path, help="write to this file (needed for parquet)")
    results.add_argument("--stats", action="store_true", help="one row per variant: paired statistics")
    results.set_defaults(run=_results)

    report = commands.add_parser(
        "report",
        help="write the sweep's dashboard (dashboards/<sweep>/index.html) and log it to MLflow",
        description="Compare every variant with the baseline, paired by seed (means with 95%% CIs, paired "
        "differences, t and Wilcoxon tests with Holm's correction, effect sizes, seeds needed, cost), "
        "draw the figures, and write dashboards/<sweep>/index.html and report.md. The same figures and "
        "table go to the sweep's MLflow parent run.",
    )
    _add_sweep_arguments(report)
    report.add_argument("--out-dir", type=Path, default=Path("dashboards"), help="default: dashboards")
    report.add_argument("--storage", metavar="URL", help="the sweep's Optuna storage (search figures)")
    report.add_argument("--runs-dir", type=Path, default=Path("runs"), help="default: runs")
    report.add_argument("--mlflow-url", default="http://127.0.0.1:5000", help="where run links point")
    report.set_defaults(run=_report)


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="NAME_OR_PATH", help="a sweep name or YAML file")
    parser.add_argument("--metric", help="compare on this metric instead of the sweep's")
    parser.add_argument(
        "--profile",
        type=Profile,
        choices=list(Profile),
        default=Profile.auto,
        help="which run of the sweep: full, cpu, or auto (cpu without a GPU)",
    )
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default as for sweep)")


def _results(args: argparse.Namespace) -> int:
    from mta_lab.analysis import compare, results_frame, sweep_runs

    data = sweep_runs(args.sweep, args.profile, args.tracking_uri)
    metric = args.metric or data.sweep.spec.metric.name
    frame = results_frame(data, metric)
    if args.stats:
        if frame.is_empty() or metric not in frame.columns:
            raise common.UsageError(f"no run of '{data.sweep.spec.name}' logged '{metric}'")
        frame = compare(frame, metric, data.sweep.spec.metric.goal)
    if args.format == "parquet":
        if args.out is None:
            raise common.UsageError("--format parquet writes a file: give --out PATH")
        frame.write_parquet(args.out)
    elif args.format == "csv":
        text = frame.write_csv()
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
    else:
        _print_table(frame, metric, args.stats)
    if args.out:
        print(f"{frame.height} rows written to {args.out}")
    return 0


def _print_table(frame, metric: str, stats: bool, held: str = "") -> None:
    if stats:
        from mta_lab.analysis.report import DISPLAY, display_rows

        title = f"{metric} against the baseline{f', at {held}' if held else ''}"
        table = Table(*DISPLAY.values(), box=None, title=title, title_justify="left")
        for row in display_rows(frame):
            table.add_row(*("" if row[key] is None else str(row[key]) for key in DISPLAY))
        common.console().print(table)
        return
    columns = [
        "variant",
        "seed",
        "status",
        metric,
        f"best {metric}",
        "tokens_per_s",
        "peak_memory_mb",
        "wall_time_s",
    ]
    columns = [c for c in columns if c in frame.columns]
    table = Table(*columns, box=None)
    for row in frame.select(columns).iter_rows():
        table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    common.console().print(table)


def print_multipliers(rows: list[dict]) -> None:
    """A scaling sweep's answer: each variant's compute multiplier, in FLOPs and in time."""
    if not rows:
        return
    console = common.console()
    console.print("\n[bold]Compute multiplier[/bold] (against the baseline at the top of the ladder):")
    for row in rows:
        unit = "FLOPs" if row["axis"] == "flops" else "time"
        console.print(f"  {row['variant']} ({unit}): {row['text']}", highlight=False)


def _report(args: argparse.Namespace) -> int:
    from mta_lab.analysis.report import build_report, iso_blocks

    console = common.console()
    with console.status("reading the runs and drawing the figures ..."):
        report = build_report(
            args.sweep,
            profile=args.profile,
            tracking_uri=args.tracking_uri,
            out_dir=args.out_dir,
            metric=args.metric,
            storage=args.storage,
            runs_dir=args.runs_dir,
            mlflow_url=args.mlflow_url,
        )
    _print_table(report.comparison, report.metric, stats=True, held=report.held)
    for block in iso_blocks(report.iso):
        console.print(f"\n[bold]At {block['title']}[/bold] ({block['at']}, the most every run reached):")
        for row in (r for r in block["rows"] if r["verdict"] != "baseline"):
            delta = f"delta {row['delta_text']}, " if row["delta_text"] else ""
            console.print(f"  {row['variant']}: {delta}{row['verdict']}", highlight=False)
    print_multipliers(report.multipliers)
    console.print(
        f"dashboard: {report.index.resolve()} (open it in a browser; no server needed)", highlight=False
    )
    console.print(f"markdown:  {report.markdown.resolve()}", highlight=False)
    console.print(
        "MLflow: the same figures and table are artifacts of the sweep's parent run (report/); "
        "browse with `mta-lab ui`",
        highlight=False,
    )
    return 0
