"""Credentials in store URLs never leave the process that was given them.

``postgresql://user:PASSWORD@host/db`` (an Optuna storage) and ``http://user:TOKEN@host`` (an MLflow
server) are shown as ``postgresql://user:***@host/db`` in every message, log, file and record; worker
processes get the real URLs through their environment, not their command lines (which ``ps`` shows
to every user of the machine).
"""

from __future__ import annotations

import re

CREDENTIALS = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<secret>[^@\s'\"]+)@"
)
MASK = "***"

STORAGE_ENV = "MTA_LAB_STORAGE"
"""The Optuna storage URL a worker reads when no --storage is given."""
TRACKING_ENV = "MLFLOW_TRACKING_URI"
"""MLflow's own variable for the tracking URI (every MLflow client reads it)."""


def mask(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    return CREDENTIALS.sub(rf"\g<scheme>\g<user>:{MASK}@", text)


def is_masked(url: str) -> bool:
    """Whether ``url`` is a masked copy, which cannot be used to connect."""
    return f":{MASK}@" in url
