"""SIGTERM and SIGHUP raise SystemExit inside the block, and only there; an ignored signal stays ignored."""

import os
import signal
import time

import pytest

from mnist_gan.signals import exit_on_stop_signals


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")])
def test_a_stop_signal_raises_system_exit_and_the_handler_comes_back(signum, name):
    # the default disposition, even where the suite itself runs under nohup (SIGHUP ignored)
    outer = signal.signal(signum, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit, match=f"^terminated by {name}$"), exit_on_stop_signals():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
        assert signal.getsignal(signum) is signal.SIG_DFL
    finally:
        signal.signal(signum, outer)


def test_a_signal_ignored_by_the_parent_stays_ignored():
    """`nohup dvc repro`: SIGHUP is ignored from the start and must not end the stage."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with exit_on_stop_signals():
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
