"""The one base class of the failures a user can fix (a bad param, a missing file, a store that
cannot be reached): the command line and every DVC stage print its message as one line and exit
with status 2, without a traceback. Anything else is a bug, and keeps its traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure with a message that says what is wrong and how to fix it."""


def log_to_stderr() -> None:
    """INFO and above on stderr, each line naming its level and logger: the stages' and `tune`'s."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_stage(main: Callable[[], None]) -> None:
    """A DVC stage's entry point: logging to stderr, then `main`; a UserError ends it in one line."""
    log_to_stderr()
    try:
        main()
    except UserError as err:
        print(f"ERROR {sys.argv[0]}: {err}", file=sys.stderr)
        sys.exit(2)
