"""Optuna storages as mta-lab opens them: a damaged journal is repaired, not fatal."""

from __future__ import annotations

import optuna

from mta_lab.sweep.storage import open_storage, repair_journal


def test_a_torn_or_garbled_journal_keeps_its_sound_records(tmp_path, caplog):
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    study.enqueue_trial({}, user_attrs={"cell": "a"})
    sound = journal.read_bytes()
    assert repair_journal(journal) is None and journal.read_bytes() == sound
    with journal.open("ab") as stream:
        stream.write(b"\x00\x00garbage\n" + b'{"op_code": 4, "worker_id": "ab')  # a zeroed block, a cut record
    reopened = optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    assert "2 damaged record(s)" in caplog.text
    assert journal.read_bytes() == sound and [t.user_attrs["cell"] for t in reopened.get_trials()] == ["a"]
    (aside,) = tmp_path.glob("optuna.journal.damaged-*")
    assert aside.read_bytes().endswith(b'"worker_id": "ab')
    reopened.enqueue_trial({}, user_attrs={"cell": "b"})  # appends land on a whole line again
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{journal}"))
    assert [t.user_attrs["cell"] for t in again.get_trials()] == ["a", "b"]


def test_a_reused_pid_does_not_pass_for_the_dead_worker():
    import os
    import socket

    from mta_lab.sweep.worker import _alive, _start_time

    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}

    def trial(worker):
        return optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"worker": worker})

    assert _alive(trial(me))
    assert not _alive(trial({**me, "started": me["started"] - 1}))  # same pid, another process
    assert _alive(trial({**me, "host": "elsewhere"}))  # another machine: its heartbeat decides
