"""Ctrl-C and SIGTERM: the first stops the work, later ones cannot cut the cleanup short."""

import os
import signal

import pytest

from mta_lab.infra.signals import Interrupted, stop_after, stop_once


def test_the_first_signal_interrupts_and_later_ones_do_not_cut_the_cleanup_short():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    cleaned = []
    with pytest.raises(Interrupted, match="SIGTERM"):
        with stop_once():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0)  # let the handler run (it runs between bytecodes)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C during the cleanup
                os.kill(os.getpid(), signal.SIGTERM)
                cleaned.append("status recorded")
    assert cleaned == ["status recorded"]
    assert {number: signal.getsignal(number) for number in before} == before


def test_ctrl_c_is_a_keyboard_interrupt_for_the_code_that_handles_one():
    with pytest.raises(KeyboardInterrupt):
        with stop_once():
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)


def test_a_signal_inside_a_store_call_stops_the_work_after_it():
    """A call into the store completes (an interrupted SQLite write would keep the file locked), then
    the signal stops the work; later signals still cannot cut the cleanup short."""
    steps = []
    with pytest.raises(Interrupted, match="SIGTERM"):
        with stop_once():
            with stop_after():
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0)
                steps.append("write completed")
            steps.append("went on")
    assert steps == ["write completed"]
    with pytest.raises(Interrupted, match="SIGINT"):  # not lost to an error of the call
        with stop_once():
            with stop_after():
                os.kill(os.getpid(), signal.SIGINT)
                signal.sigtimedwait([], 0)
                raise RuntimeError("the store refused")
