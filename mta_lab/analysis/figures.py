"""The report's figures (matplotlib): each function returns a Figure, or None when the sweep has
nothing to show for it."""

from __future__ import annotations

import re

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

VERDICT_COLORS = {"better": "#1a7f37", "worse": "#cf222e"}
NEUTRAL = "#6e7781"
BASELINE_COLOR = "#24292f"


def _color(verdict: str) -> str:
    return next((c for word, c in VERDICT_COLORS.items() if verdict.startswith(word)), NEUTRAL)


def forest(table: pl.DataFrame, metric: str) -> Figure | None:
    """Each variant's paired difference to the baseline with its 95% interval."""
    rows = table.filter(pl.col("delta").is_not_null())
    if rows.is_empty():
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * rows.height + 1.4))
    y = np.arange(rows.height)[::-1]
    for yi, row in zip(y, rows.iter_rows(named=True), strict=True):
        color = _color(row["verdict"])
        ax.errorbar(
            row["delta"],
            yi,
            xerr=[[row["delta"] - row["delta_low"]], [row["delta_high"] - row["delta"]]],
            fmt="o",
            color=color,
            capsize=3,
        )
    ax.axvline(0, color=BASELINE_COLOR, linewidth=1, linestyle="--")
    ax.set_yticks(y, rows["variant"].to_list())
    ax.set_xlabel(f"{metric}: variant - baseline on the same seed (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def curves(history: pl.DataFrame, metrics: list[str], baseline: str = "baseline") -> Figure | None:
    """Mean over seeds of each variant's metric by step, with a band of +-1 standard deviation."""
    panels = [m for m in metrics if history.filter(pl.col("metric") == m)["step"].n_unique() > 1]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    variants = history["variant"].unique(maintain_order=True).to_list()
    for ax, metric in zip(axes[0], panels, strict=True):
        _variant_bands(ax, history.filter(pl.col("metric") == metric), "step", variants, baseline)
        _label(ax, "optimizer step", metric, f"{metric} (mean over seeds, band: +-1 sd)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.grid(alpha=0.3)


def _variant_bands(ax, points: pl.DataFrame, x: str, variants: list[str], baseline: str) -> None:
    """Each variant's mean ``value`` over seeds at each step, against ``x`` (the step, or what the step
    had spent), with a band of +-1 sd; the baseline dashed, dots where a line would mislead."""
    palette = plt.get_cmap("tab10")
    spent = [] if x == "step" else [pl.col(x).mean()]
    for index, variant in enumerate(variants):
        by_step = (points.filter(pl.col("variant") == variant).group_by("step")
                   .agg(*spent, pl.col("value").mean().alias("mean"), pl.col("value").std().fill_null(0).alias("std"))
                   .sort("step"))  # fmt: skip
        if by_step.is_empty():
            continue
        is_base = variant == baseline
        color = BASELINE_COLOR if is_base else palette(index % 10)
        xs, mean, std = by_step[x].to_numpy(), by_step["mean"].to_numpy(), by_step["std"].to_numpy()
        ax.plot(xs, mean, color=color, linestyle="--" if is_base else "-", marker="o" if len(xs) < 3 else None,
                linewidth=1.5, markersize=3, label=variant)  # fmt: skip
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.12)


def axis_effects(
    runs: pl.DataFrame, axes: list[str], metric: str, baseline_mean: float | None
) -> Figure | None:
    """The metric over numeric axes: a heat map for two, a line with its 95% interval for one."""
    numeric = [a for a in axes if a in runs.columns and runs[a].dtype.is_numeric()]
    variants = runs.filter(pl.col("role") != "baseline")
    if len(numeric) == 2:
        x_key, y_key = numeric
        means = variants.group_by([x_key, y_key]).agg(pl.col(metric).mean())
        xs, ys = sorted(means[x_key].unique().to_list()), sorted(means[y_key].unique().to_list())
        grid = np.full((len(ys), len(xs)), np.nan)
        for row in means.iter_rows(named=True):
            grid[ys.index(row[y_key]), xs.index(row[x_key])] = row[metric]
        fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.9 * len(ys) + 2))
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                ax.text(j, i, f"{value:.4g}", ha="center", va="center", color=ink, fontsize=9)
        ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
        ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
        ax.set_xlabel(x_key.split(".")[-1])
        ax.set_ylabel(y_key.split(".")[-1])
        title = f"{metric}, mean over seeds" + (
            f" (baseline {baseline_mean:.4g})" if baseline_mean is not None else ""
        )
        ax.set_title(title, loc="left")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return fig
    if len(numeric) == 1:
        key = numeric[0]
        summary = (variants.group_by(key).agg(pl.col(metric).mean().alias("mean"), pl.col(metric).std().alias("std"),
                                              pl.len().alias("n")).sort(key))  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.5, 4))
        half = 1.96 * summary["std"].fill_null(0).to_numpy() / np.sqrt(summary["n"].to_numpy())
        ax.errorbar(summary[key].to_numpy(), summary["mean"].to_numpy(), yerr=half, fmt="o-", capsize=3)
        if baseline_mean is not None:
            ax.axhline(baseline_mean, color=BASELINE_COLOR, linestyle="--", label="baseline")
            ax.legend()
        ax.set_xlabel(key.split(".")[-1])
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by {key.split('.')[-1]} (mean, ~95% CI)", loc="left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig
    return None


def quality_cost(table: pl.DataFrame, metric: str) -> Figure | None:
    """Each variant's metric against its time per step relative to the baseline."""
    rows = table.filter(pl.col("time_ratio").is_not_null())
    if rows.height < 2:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    palette = plt.get_cmap("tab10")
    for index, row in enumerate(rows.iter_rows(named=True)):
        color = BASELINE_COLOR if row["verdict"] == "baseline" else palette(index % 10)
        low = row["mean"] - (row["ci_low"] if row["ci_low"] is not None else row["mean"])
        high = (row["ci_high"] if row["ci_high"] is not None else row["mean"]) - row["mean"]
        ax.errorbar(
            row["time_ratio"],
            row["mean"],
            yerr=[[low], [high]],
            fmt="o",
            color=color,
            capsize=3,
            label=row["variant"],
        )
    ax.set_xlabel("time per training step relative to the baseline")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


CELL = re.compile(r"^(?P<task>niah|babilong)/acc/(?P<cell>.+)$")


def task_heatmaps(runs: pl.DataFrame) -> Figure | None:
    """Long-context accuracy per variant: needle depth x context length (NIAH), task x distractor
    tokens (BabiLong), averaged over the other dimensions and over seeds."""
    panels = []
    for task, (row_key, column_key) in {
        "niah": ("depth", "context"),
        "babilong": ("task", "distractors"),
    }.items():
        cells = []
        for column in runs.columns:
            match = CELL.match(column)
            if match and match["task"] == task:
                parts = dict(part.rsplit("_", 1) for part in match["cell"].split("/"))
                if row_key in parts and column_key in parts and len(parts) == (3 if task == "niah" else 2):
                    cells.append((column, parts[row_key], parts[column_key]))
        if cells:
            panels.append((task, row_key, column_key, cells))
    if not panels:
        return None
    variants = runs["variant"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(
        len(panels), len(variants), figsize=(3.2 * len(variants), 2.8 * len(panels)), squeeze=False
    )
    for p, (task, row_key, column_key, cells) in enumerate(panels):
        rows = sorted({r for _, r, _ in cells}, key=_sort_key)
        columns = sorted({c for _, _, c in cells}, key=_sort_key)
        for v, variant in enumerate(variants):
            group = runs.filter(pl.col("variant") == variant)
            sums = np.zeros((len(rows), len(columns)))
            counts = np.zeros_like(sums)
            for column, r, c in cells:
                values = group[column].drop_nulls()
                if values.len():
                    sums[rows.index(r), columns.index(c)] += values.mean()
                    counts[rows.index(r), columns.index(c)] += 1
            ax = axes[p][v]
            grid = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
            ax.imshow(grid, vmin=0, vmax=1, cmap="Greens", aspect="auto", origin="lower")
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(columns)), columns, fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_xlabel(column_key)
            ax.set_ylabel(row_key)
            ax.set_title(f"{task}: {variant}", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def _sort_key(text: str):
    return (0, float(text)) if text.replace(".", "", 1).isdigit() else (1, text)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


COMPUTE_LABELS = {
    "flops": "training FLOPs (forward + backward)",
    "seconds": "training time (s, evaluation excluded)",
}


def compute_curves(
    points: pl.DataFrame, metric: str, shared: dict[str, float | None], baseline: str = "baseline"
) -> Figure | None:
    """The metric against cumulative training FLOPs and against training time, per variant: the mean
    over seeds at each evaluation, with a band of +-1 sd; a dotted line where all variants still are."""
    if points.is_empty() or points["step"].n_unique() < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), squeeze=False)
    variants = points["variant"].unique(maintain_order=True).to_list()
    for ax, axis in zip(axes[0], ("flops", "seconds"), strict=True):
        _variant_bands(ax, points, axis, variants, baseline)
        if shared.get(axis):
            ax.axvline(shared[axis], color=NEUTRAL, linestyle=":", linewidth=1)
        _label(ax, COMPUTE_LABELS[axis], metric, f"{metric} by {axis} (mean over seeds, band: +-1 sd)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def scaling_fits(
    runs: pl.DataFrame, fits: dict[str, dict], metric: str, baseline: str = "baseline"
) -> Figure:
    """Each variant's final metric against its compute (a point per run) with its fitted curve, in
    FLOPs and in training time (log compute). ``fits[axis][variant]`` is a PowerLaw (or absent)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), squeeze=False)
    palette = plt.get_cmap("tab10")
    variants = runs["variant"].unique(maintain_order=True).to_list()
    for ax, (axis, column) in zip(
        axes[0], (("flops", "train/flops"), ("seconds", "train/seconds")), strict=True
    ):
        for index, variant in enumerate(variants):
            group = runs.filter(pl.col("variant") == variant)
            color = BASELINE_COLOR if variant == baseline else palette(index % 10)
            ax.scatter(group[column], group[metric], color=color, s=14, alpha=0.7, label=variant)
            fit = fits.get(axis, {}).get(variant)
            if fit is not None:
                grid = np.geomspace(group[column].min(), group[column].max(), 100)
                ax.plot(grid, fit.loss(grid), color=color, linestyle="--" if variant == baseline else "-")
        ax.set_xscale("log")  # the ladder doubles; the loss stays linear to read off
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
        ax.set_xlabel(COMPUTE_LABELS[axis])
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {axis}: runs and fitted curves", loc="left")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
