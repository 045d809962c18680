"""Stopping on Ctrl-C or SIGTERM without losing the record of what was stopped.

A sweep's Ctrl-C reaches the launcher, its workers and their training processes at once, and the
launcher and the workers then pass SIGTERM down as well. Each process must turn the *first* of these
signals into an exception and let the cleanup it starts (marking MLflow runs KILLED, failing Optuna
trials, stopping children) run to the end: a second signal landing inside that cleanup would leave a
run RUNNING forever.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (Ctrl-C or SIGTERM); handled like Ctrl-C everywhere."""


class _FirstSignal:
    """A handler that raises once and ignores the signals after it.

    A flag, not a change of disposition: Lightning saves and later restores the handlers it finds, so
    only the handler object itself reliably remembers that it already fired."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.fired:
            return
        self.fired = True
        name = signal.Signals(signum).name
        if _deferred.depth:
            _deferred.pending = name
            return
        raise Interrupted(name)


class _Deferred:
    depth = 0
    pending: str | None = None


_deferred = _Deferred()


@contextmanager
def stop_after() -> Iterator[None]:
    """Within the block (in the main thread, where signal handlers run), the first signal of
    :func:`stop_once` raises at the block's end instead of inside it.

    For calls into a store: an MLflow write interrupted inside its SQLite transaction keeps the file
    locked until its frames are gone, and the cleanup's own write (the run's KILLED status) then waits
    on that lock, in the same process, forever (seen in runs that log every step)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferred.depth += 1
    try:
        yield
    finally:
        _deferred.depth -= 1
        if _deferred.depth == 0 and _deferred.pending is not None:
            name, _deferred.pending = _deferred.pending, None
            raise Interrupted(name)  # also over an error of the block: the stop must not be lost


@contextmanager
def stop_once() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises :class:`Interrupted`; later ones are ignored.

    Put the cleanup (``except``/``finally``) inside the block. Outside the main thread (where
    handlers cannot be installed) the block runs unchanged."""
    try:
        handler = _FirstSignal()
        previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
