"""Expected failures are logged as their one line, in the console and in the Prefect UI.

Prefect logs every exception a flow or task raises with its traceback. A `ModelyardError` is an
expected failure (a gate, a spec field, an export that cannot be proven) whose message already
says what is wrong and how to fix it; a traceback would only bury that line. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import logging

from modelyard.errors import ModelyardError

PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ModelyardError):
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    """Idempotent: each run logger gets one filter."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedFailures) for f in logger.filters):
            logger.addFilter(ExpectedFailures())
