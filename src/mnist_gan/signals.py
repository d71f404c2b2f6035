"""SIGTERM and SIGHUP as a SystemExit, for the stages that hold an MLflow run open.

Python dies of those signals without unwinding, which would leave the run RUNNING. Raised as
an exception instead, they end it FAILED with the signal as its reason, as Ctrl-C
(KeyboardInterrupt) already does. SIGKILL cannot be caught: a resume reopens that run.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(f"terminated by {signal.Signals(signum).name}")


@contextmanager
def exit_on_stop_signals() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise SystemExit("terminated by SIGTERM");
    the previous handlers come back after it."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:  # a process started with a signal ignored (nohup) keeps it so
            signal.signal(s, _raise_on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
