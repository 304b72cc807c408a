"""What the CLI shows while it works: one tqdm bar helper and the logging set-up every command shares.

Bars go to stderr and only to a terminal (tqdm's ``disable=None``): CI logs, pipes and ``--json`` runs get
none. While a bar is shown, log records go through ``tqdm.write`` (``tqdm.contrib.logging``), which clears
the bar, prints the line and redraws the bar below it, so a bar and a log line never share a line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("sdrt", "sdrt_export")  # what -vv turns to DEBUG (other libraries stay at INFO)


def setup_logging(verbosity: int = 0) -> None:
    """Console logging for a CLI run: WARNING by default, INFO with ``-v``, and DEBUG for sdrt's own
    loggers with ``-vv``. A command's result is its printed message, never a log line, so the default
    output holds each result once."""
    logging.basicConfig(level=logging.INFO if verbosity >= 1 else logging.WARNING, format=LOG_FORMAT)
    level = logging.DEBUG if verbosity >= 2 else logging.NOTSET
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _console_loggers() -> list[logging.Logger]:
    """The root logger plus every logger with a console handler of its own (transformers and diffusers
    add one and stop propagation); redirecting a logger without one would print its records twice."""
    loggers = [logging.root]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and any(_is_console(h) for h in logger.handlers):
            loggers.append(logger)
    return loggers


@contextlib.contextmanager
def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> Iterator[tqdm]:
    """A tqdm bar on stderr that disappears when closed, shown only when stderr is a terminal and
    ``enabled`` (pass ``enabled=not args.json``). Log records are routed above it while it is open.

    >>> with progress_bar(items, desc="export", unit="component") as bar:
    ...     for item in bar: ...
    """
    bar = tqdm(iterable, disable=None if enabled else True, leave=False, file=sys.stderr, dynamic_ncols=True,
               **kwargs)
    redirect = contextlib.nullcontext() if bar.disable else logging_redirect_tqdm(loggers=_console_loggers())
    try:
        with redirect:
            yield bar
    finally:
        bar.close()
