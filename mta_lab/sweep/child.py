"""The training process of one sweep cell: ``python -m mta_lab.sweep.child RUN_DIR``.

A worker starts it after writing the cell's ``config.yaml`` and ``run.json`` (the MLflow run it
created) into RUN_DIR. It trains in that run, resumes from RUN_DIR's checkpoint when the cell ran
before, and appends every logged metric to ``progress.jsonl`` for the worker, which owns the Optuna
trial. Exit code 0: finished; 1: failed; 143: stopped (SIGTERM, e.g. pruned).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

PROGRESS_FILE = "progress.jsonl"


def main(argv: list[str]) -> int:
    from mta_lab.assembly.run_data import load_run_data
    from mta_lab.config import load_config
    from mta_lab.infra.tracking import RunRecord
    from mta_lab.secrets import TRACKING_ENV
    from mta_lab.train.loggers import JsonlLogger
    from mta_lab.train.run import CONFIG_FILE, RUN_FILE, fit_run

    run_dir = Path(argv[0])
    info = json.loads((run_dir / RUN_FILE).read_text())
    info["tracking_uri"] = os.environ.get(TRACKING_ENV) or info["tracking_uri"]  # run.json keeps no password
    try:
        config = load_config(str(run_dir / CONFIG_FILE))
        run_data = load_run_data(config)
        # This process is rank 0 of a run on several processes (runtime.devices): fit_run starts the
        # others (mta_lab.train.ddp), which never run this module.
        record = RunRecord.reopen(info["tracking_uri"], info["run_id"])
        started = (run_dir / "manifest.json").is_file()  # written when the run first started
        fit_run(
            config,
            run_data,
            record,
            run_dir,
            info["tracking_uri"],
            info["source"],
            resume=started,
            progress=False,
            loggers=[JsonlLogger(run_dir / PROGRESS_FILE)],
        )
    except (KeyboardInterrupt, SystemExit):
        return 143
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
