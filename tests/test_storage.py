"""Stores as mta-lab opens them: a damaged Optuna journal is repaired, a busy MLflow store waited out."""

from __future__ import annotations

import optuna
import pytest

from mta_lab.sweep.storage import open_storage, repair_journal


def test_a_torn_or_garbled_journal_keeps_its_sound_records(tmp_path, caplog):
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    study.enqueue_trial({}, user_attrs={"cell": "a"})
    sound = journal.read_bytes()
    assert repair_journal(journal) is None and journal.read_bytes() == sound
    with journal.open("ab") as stream:
        stream.write(
            b"\x00\x00garbage\n" + b'{"op_code": 4, "worker_id": "ab'
        )  # a zeroed block, a cut record
    reopened = optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    assert "2 damaged record(s)" in caplog.text
    assert journal.read_bytes() == sound and [t.user_attrs["cell"] for t in reopened.get_trials()] == ["a"]
    (aside,) = tmp_path.glob("optuna.journal.damaged-*")
    assert aside.read_bytes().endswith(b'"worker_id": "ab')
    reopened.enqueue_trial({}, user_attrs={"cell": "b"})  # appends land on a whole line again
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    assert [t.user_attrs["cell"] for t in again.get_trials()] == ["a", "b"]


def test_a_busy_mlflow_store_is_waited_out_and_other_errors_are_not(monkeypatch):
    from mlflow.exceptions import MlflowException

    from mta_lab.infra import tracking

    pauses = []
    monkeypatch.setattr(tracking.time, "sleep", pauses.append)
    calls = []

    def write(value):
        calls.append(value)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return value

    assert tracking._patient(write)("tag") == "tag" and len(calls) == 3 and len(pauses) == 2

    def broken():
        calls.append("broken")
        raise MlflowException("(sqlite3.OperationalError) disk I/O error")

    calls.clear()
    with pytest.raises(MlflowException, match="disk I/O"):
        tracking._patient(broken)()
    assert calls == ["broken"]  # a store that cannot be written is said at once, not after retries

    def always_busy():
        raise MlflowException("database is locked")

    pauses.clear()
    with pytest.raises(MlflowException, match="locked"):
        tracking._patient(always_busy)()
    assert 15 < sum(pauses) < 60  # about half a minute, then the error is let through


def test_processes_opening_a_new_sqlite_store_together_do_not_break_it(tmp_path):
    """MLflow migrates a new SQLite store's schema as a client opens it; unlocked, three processes doing
    so at once failed in 13 of 15 tries (alembic: "Online migration expected to match one row")."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    opener = (
        "import sys; from mta_lab.infra.tracking import TrackingClient; "
        "print(TrackingClient(sys.argv[1]).create_experiment(sys.argv[2]))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", opener, uri, f"e{k}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    from mlflow.tracking import MlflowClient

    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"e0", "e1", "e2"} <= names
