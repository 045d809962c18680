"""A password given in a store URL is masked in everything mta-lab prints or writes."""

from __future__ import annotations

import socket

from mta_lab.cli import main
from mta_lab.secrets import is_masked, mask

SECRET = "Pg-P4ssw0rd-x1"


def test_mask_hides_the_password_of_every_url_and_nothing_else():
    text = f"no study 'x' at postgresql://mta:{SECRET}@127.0.0.1:55432/db; MLflow at http://ops:t0k%40n@host:5000"
    assert (
        mask(text)
        == "no study 'x' at postgresql://mta:***@127.0.0.1:55432/db; MLflow at http://ops:***@host:5000"
    )
    for plain in ("journal:/tmp/x/optuna.journal", "sqlite:////tmp/mlflow.db", "http://host:5000/", "a: b@c"):
        assert mask(plain) == plain
    assert is_masked(mask(f"postgresql://mta:{SECRET}@h/db")) and not is_masked("postgresql://mta@h/db")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_database_is_one_line_naming_it_without_the_password(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = closed_port()
    url = f"postgresql://mta:{SECRET}@127.0.0.1:{port}/sweeps"
    for command in (["status", "kernel_size"], ["sweep", "kernel_size"], ["worker", "kernel_size"]):
        assert main([*command, "--storage", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and SECRET not in err, err
        assert (
            f"postgresql://mta:***@127.0.0.1:{port}/sweeps: cannot open the database 127.0.0.1:{port}/sweeps"
            in err
        )
    assert not (tmp_path / "mlflow.db").exists()  # a bad storage starts no MLflow run


def test_the_sweep_plan_shows_stores_masked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking = f"http://ops:{SECRET}@127.0.0.1:5999"
    assert main(["sweep", "toy_block", "--dry-run", "--tracking-uri", tracking]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "http://ops:***@127.0.0.1:5999" in out
