"""``mta-lab report``: a sweep's comparison as a self-contained dashboard and a Markdown report.

``dashboards/<sweep>/index.html`` opens from disk (figures are inline SVG; no script, no network);
``report.md`` shows the same table with PNG figures next to it. Both, the figures and the table are
also logged to the sweep's MLflow parent run, so the MLflow UI shows them too.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from mta_lab.analysis import figures, scaling
from mta_lab.analysis.compute import AXES, at_compute, iso_compute
from mta_lab.analysis.results import histories, results_frame, sweep_runs
from mta_lab.analysis.stats import ALPHA, POWER, compare
from mta_lab.config import ConfigError
from mta_lab.config.sweep import Design
from mta_lab.secrets import mask
from mta_lab.sweep.spec import Profile

TITLES = {
    "forest": "Difference to the baseline (paired by seed)",
    "scaling": "The metric against compute, with each variant's fitted curve",
    "curves": "Learning curves",
    "compute": "The metric against training FLOPs and training time",
    "axes": "The metric over the sweep's axes",
    "cost": "Quality against cost",
    "tasks": "Long-context accuracy",
    "search_history": "Search: optimization history",
    "search_importance": "Search: parameter importances",
}


@dataclass
class Report:
    metric: str
    directory: Path
    index: Path
    markdown: Path
    comparison: pl.DataFrame
    runs: pl.DataFrame
    held: str
    """What the comparison holds equal: "equal tokens", "equal FLOPs" or "equal time" (a scaling
    sweep: at its top rung)."""
    iso: dict[str, tuple[float | None, pl.DataFrame]]
    """Per compute axis (flops, seconds): the largest value all runs reached and the comparison there."""
    multipliers: list[dict]
    """A scaling sweep's compute multiplier per variant and axis: variant, axis, text, estimate, low,
    high (None where the fit was refused; text says why)."""


def build_report(
    name_or_path: str,
    *,
    profile: Profile = Profile.auto,
    tracking_uri: str | None = None,
    out_dir: Path = Path("dashboards"),
    metric: str | None = None,
    storage: str | None = None,
    runs_dir: Path = Path("runs"),
    mlflow_url: str = "http://127.0.0.1:5000",
    log_to_mlflow: bool = True,
) -> Report:
    data = sweep_runs(name_or_path, profile, tracking_uri)
    spec = data.sweep.spec
    metric = metric or spec.metric.name
    runs = results_frame(data, metric)
    finished = runs.filter(pl.col("status") == "FINISHED") if runs.height else runs
    if finished.is_empty():
        states = (
            ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().iter_rows())
            if runs.height
            else "none"
        )
        raise ConfigError(
            f"sweep '{spec.name}' has no finished runs yet (runs: {states}); run `mta-lab sweep {name_or_path}` "
            f"or see `mta-lab status {name_or_path}`"
        )
    if metric not in finished.columns or finished[metric].null_count() == finished.height:
        logged = sorted(c for c in finished.columns if "/" in c and not c.startswith("best "))
        raise ConfigError(
            f"no finished run of '{spec.name}' logged '{metric}' (logged: {', '.join(logged)}); choose one with --metric"
        )

    history = histories(data, ["train/loss", metric, *AXES.values()])
    held, multipliers, fits = spec.held_equal, [], {}
    iso: dict[str, tuple[float | None, pl.DataFrame]] = {}
    points = pl.DataFrame()
    if spec.design == Design.scaling:  # compared at its top rung; the ladder gives the multipliers
        runs, top = scaling.by_rung(runs)
        finished = runs.filter(pl.col("status") == "FINISHED")
        multipliers, fits = scaling.ladder_multipliers(finished, metric)
        held = f"{held}, at the top rung ({top})"
        compared = runs.filter(pl.col("rung") == top)
    else:  # and at equal FLOPs and equal time, read off the histories
        points = at_compute(history, metric)
        iso = {axis: iso_compute(points, runs, axis, spec.metric.goal) for axis in AXES}
        compared = runs
    comparison = compare(compared, metric, spec.metric.goal)
    history = history.filter(pl.col("metric").is_in(["train/loss", metric]))
    baseline_mean = (
        comparison.filter(pl.col("variant") == "baseline")["mean"].first() if comparison.height else None
    )
    made: dict[str, Figure | None] = {
        "forest": figures.forest(comparison, metric),
        "scaling": figures.scaling_fits(finished, fits, metric) if fits else None,
        "axes": figures.axis_effects(finished, list(spec.axes), metric, baseline_mean),
        "curves": figures.curves(history, ["train/loss", metric]) if not fits else None,
        "compute": figures.compute_curves(points, metric, {a: b for a, (b, _) in iso.items()}),
        "cost": figures.quality_cost(comparison, metric),
        "tasks": figures.task_heatmaps(finished),
    }
    if spec.search is not None:
        made |= _search_figures(data.sweep, storage, runs_dir)
    made = {name: fig for name, fig in made.items() if fig is not None}

    directory = out_dir / spec.name
    (directory / "figures").mkdir(parents=True, exist_ok=True)
    svgs = {}
    for name, fig in made.items():
        fig.savefig(directory / "figures" / f"{name}.png", dpi=110)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        svgs[name] = buffer.getvalue()[buffer.getvalue().index("<svg") :]  # drop the XML prolog

    def run_url(run_id: str) -> str:
        return f"{mlflow_url}/#/experiments/{data.experiment_id}/runs/{run_id}"

    context = {
        "spec": spec,
        "sweep": data.sweep,
        "metric": metric,
        "goal": spec.metric.goal.value,
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "tracking_uri": mask(data.tracking_uri),
        "parent_url": run_url(data.parent.info.run_id),
        "rows": display_rows(comparison, compared.filter(pl.col("status") == "FINISHED"), run_url),
        "held": held,
        "iso": iso_blocks(iso),
        "multipliers": multipliers,
        "runs": _run_rows(runs, metric, run_url),
        "unfinished": _unfinished(runs, run_url),
        "figures": [(TITLES[name], svgs[name], f"figures/{name}.png") for name in made],
        "alpha": ALPHA,
        "power": POWER,
        "budget": _budget(finished),
        "seeds": spec.seeds,
        "has_baseline": bool(comparison.filter(pl.col("variant") == "baseline").height),
    }
    environment = Environment(
        loader=PackageLoader("mta_lab.analysis"), autoescape=select_autoescape(["html"])
    )
    index = directory / "index.html"
    index.write_text(environment.get_template("report.html.j2").render(**context))
    markdown = directory / "report.md"
    markdown.write_text(environment.get_template("report.md.j2").render(**context))
    if log_to_mlflow:
        _log_to_parent(data, made, comparison, index, markdown)
    for fig in made.values():
        figures.plt.close(fig)
    return Report(metric, directory, index, markdown, comparison, runs, held, iso, multipliers)


ISO_TITLES = {"flops": "equal FLOPs", "seconds": "equal training time"}


def iso_blocks(iso: dict[str, tuple[float | None, pl.DataFrame]]) -> list[dict]:
    """The comparisons at equal compute as the report and the terminal show them: title, where every
    run was read, and the display rows."""
    shown = []
    for axis, (budget, table) in iso.items():
        if budget is None or table.is_empty():
            continue
        at = f"{budget:.3g} FLOPs" if axis == "flops" else f"{budget:,.1f} s of training"
        shown.append({"title": ISO_TITLES[axis], "at": at, "rows": display_rows(table)})
    return shown


DISPLAY = {  # the comparison as people read it, in the dashboard and in the terminal
    "variant": "variant",
    "mean_text": "mean [95% CI]",
    "delta_text": "delta vs baseline [95% CI]",
    "p_text": "p: t / Wilcoxon / Holm",
    "verdict": "verdict",
    "seeds_needed": "seeds for 80% power",
    "time_text": "time/step",
    "memory_text": "memory",
}


def display_rows(comparison: pl.DataFrame, finished: pl.DataFrame | None = None, run_url=None) -> list[dict]:
    """The comparison's rows with formatted text and, given the runs, links to each seed's run."""
    rows = []
    for row in comparison.iter_rows(named=True):
        seeds = (
            finished.filter(pl.col("variant") == row["variant"]).sort("seed")
            if finished is not None
            else None
        )
        rows.append(
            {
                **row,
                "mean_text": _interval(row["mean"], row["ci_low"], row["ci_high"]),
                "delta_text": _interval(row["delta"], row["delta_low"], row["delta_high"], signed=True),
                "p_text": " / ".join(_p(row[k]) for k in ("p_t", "p_wilcoxon", "p_holm"))
                if row["delta"] is not None
                else "",
                "dz_text": _num(row["effect_dz"], 2),
                "time_text": _ratio(row["time_ratio"]),
                "memory_text": _ratio(row["memory_ratio"]),
                "runs": []
                if seeds is None
                else [
                    (seed, run_url(run_id))
                    for seed, run_id in zip(seeds["seed"], seeds["run_id"], strict=True)
                ],
                "css": "better"
                if row["verdict"].startswith("better")
                else "worse"
                if row["verdict"].startswith("worse")
                else "",
            }
        )
    return rows


def _run_rows(runs: pl.DataFrame, metric: str, run_url) -> list[dict]:
    best = f"best {metric}"
    return [
        {
            "variant": row["variant"],
            "seed": row["seed"],
            "status": row["status"],
            "value": _num(row.get(metric), 4),
            "best": _num(row.get(best), 4),
            "speed": _num(row.get("tokens_per_s"), 0, grouped=True),
            "memory": _num(row.get("peak_memory_mb"), 0, grouped=True),
            "wall": _num(row.get("wall_time_s"), 0),
            "url": run_url(row["run_id"]),
            "run_id": row["run_id"],
        }
        for row in runs.iter_rows(named=True)
    ]


def _unfinished(runs: pl.DataFrame, run_url) -> list[dict]:
    """Runs that are not in the comparison, and why: a variant whose every run failed must not just
    vanish from the report."""
    rows = runs.filter(pl.col("status") != "FINISHED").sort(["variant", "seed"])
    counted = runs.filter(pl.col("status") == "FINISHED")["variant"].unique().to_list()
    return [
        {
            "variant": row["variant"],
            "seed": row["seed"],
            "status": row["status"],
            "reason": row["error"]
            or ("still running" if row["status"] == "RUNNING" else "no reason recorded"),
            "missing": row["variant"] not in counted,
            "url": run_url(row["run_id"]),
        }
        for row in rows.iter_rows(named=True)
    ]


def _budget(finished: pl.DataFrame) -> str:
    steps = finished["train/tokens"].max() if "train/tokens" in finished.columns else None
    return f"{int(steps):,} training tokens per run" if steps else ""


def _search_figures(sweep, storage: str | None, runs_dir: Path) -> dict[str, Figure | None]:
    import optuna

    from mta_lab.sweep.storage import default_storage, open_study

    try:
        study = open_study(
            sweep, storage or default_storage((runs_dir / "sweeps" / sweep.study_name).resolve())
        )
    except ConfigError:
        return {}  # the study lives elsewhere (--storage): the other figures still stand
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    made: dict[str, Figure | None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        if complete:
            made["search_history"] = optuna.visualization.matplotlib.plot_optimization_history(study).figure
        if len(complete) >= 2 and len(study.best_trial.params) >= 1:
            try:
                made["search_importance"] = optuna.visualization.matplotlib.plot_param_importances(
                    study
                ).figure
            except (RuntimeError, ValueError):
                made["search_importance"] = None  # importances need variation among the trials
    for fig in made.values():
        if fig is not None:
            fig.set_size_inches(7, 4)
            fig.tight_layout()
    return made


def _log_to_parent(
    data, made: dict[str, Figure], comparison: pl.DataFrame, index: Path, markdown: Path
) -> None:
    parent = data.parent.info.run_id
    for name, fig in made.items():
        data.client.log_figure(parent, fig, f"report/{name}.png")
    table = {
        key: [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        for key, values in comparison.to_dict(as_series=False).items()
    }
    with warnings.catch_warnings():  # MLflow's own use of pandas, not ours
        warnings.simplefilter("ignore")
        data.client.log_table(parent, data=table, artifact_file="report/comparison.json")
    data.client.log_artifact(parent, str(index), "report")
    data.client.log_artifact(parent, str(markdown), "report")


def _num(value, digits: int, grouped: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if grouped:
        return f"{value:,.{digits}f}"
    return f"{value:.{digits}f}" if digits == 0 else f"{value:.{digits}g}"


def _interval(value, low, high, signed: bool = False) -> str:
    if value is None:
        return ""
    sign = "+" if signed and value > 0 else ""
    if low is None or high is None:
        return f"{sign}{value:.4g}"
    return f"{sign}{value:.4g} [{low:.4g}, {high:.4g}]"


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"
