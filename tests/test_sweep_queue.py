"""The sweep's duplicate guard on a real (in-memory) Optuna study, without training anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import psutil
from optuna.trial import TrialState

from mta_lab.sweep.worker import _duplicate_of


def _trial(study: optuna.Study, cell: str, worker: dict | None = None) -> optuna.trial.Trial:
    trial = study.ask()
    trial.set_user_attr("cell", cell)
    if worker is not None:
        trial.set_user_attr("worker", worker)
    return trial


def test_a_cell_done_or_running_elsewhere_is_not_trained_again():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    here = socket.gethostname()
    done = _trial(study, "cell-a")
    study.tell(done, 1.0)
    alive = _trial(
        study, "cell-b", {"host": here, "pid": os.getpid(), "started": psutil.Process().create_time()}
    )
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = _trial(study, "cell-c", {"host": here, "pid": gone.pid, "started": 1})
    # Our own pid, but recorded with another start time: a reused pid, not the worker that took it.
    reused = _trial(study, "cell-g", {"host": here, "pid": os.getpid(), "started": 1.0})
    elsewhere = _trial(study, "cell-d", {"host": here + "-other", "pid": 1, "started": 1})
    failed = _trial(study, "cell-e")
    study.tell(failed, state=TrialState.FAIL)

    newcomer = study.ask().number
    assert _duplicate_of(study, newcomer, "cell-a") == done.number  # finished: never twice
    assert _duplicate_of(study, newcomer, "cell-b") == alive.number  # a live worker trains it
    assert _duplicate_of(study, newcomer, "cell-c") is None  # its worker died: train it here
    assert (
        _duplicate_of(study, newcomer, "cell-d") == elsewhere.number
    )  # another machine's: its heartbeat decides
    assert _duplicate_of(study, newcomer, "cell-e") is None  # a failed attempt is tried again
    assert _duplicate_of(study, newcomer, "cell-f") is None  # nobody has it
    assert _duplicate_of(study, newcomer, "cell-g") is None  # the pid was reused: its worker is gone
    assert _duplicate_of(study, done.number, "cell-a") is None  # a trial is not its own duplicate
    assert newcomer not in (dead.number, reused.number)


def test_a_dead_workers_trial_is_failed_once_with_its_reason():
    """Pins the one call into Optuna's private storage API (``fail_trial``)."""
    from mta_lab.sweep.storage import fail_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.ask()
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert fail_trial(study, running, "its worker died")
    (failed,) = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["error"] == "its worker died"
    assert not fail_trial(study, running, "again")  # already ended: left as it is
    assert study.get_trials()[0].user_attrs["error"] == "its worker died"


def test_each_cell_is_queued_once_and_again_only_after_it_failed():
    from mta_lab.sweep.launcher import enqueue
    from mta_lab.sweep.spec import Profile, expand, load_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = load_sweep("toy_block", Profile.cpu)
    cells = expand(sweep)  # 2 variants x 3 seeds
    study = optuna.create_study()
    assert enqueue(study, sweep, cells) == ([], 6)
    assert enqueue(study, sweep, cells) == ([], 0)  # a second launcher adds nothing
    finished, crashed = study.ask(), study.ask()  # workers take the first two cells
    study.tell(finished, 0.5)
    study.tell(crashed, state=TrialState.FAIL)
    done, queued = enqueue(study, sweep, cells)
    assert [c.config_hash for c in done] == [finished.user_attrs["cell"]]
    assert queued == 1  # the failed cell, once; the finished one never, the waiting ones not again
    waiting = [t.user_attrs["cell"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert sorted(waiting) == sorted(
        c.config_hash for c in cells if c.config_hash != finished.user_attrs["cell"]
    )
