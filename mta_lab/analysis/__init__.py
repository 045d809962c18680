"""Analysis: a sweep's runs as Polars frames, paired statistics against the baseline, dashboards."""

from mta_lab.analysis.results import histories, results_frame, sweep_runs
from mta_lab.analysis.stats import compare

__all__ = ["compare", "histories", "results_frame", "sweep_runs"]
