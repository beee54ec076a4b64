"""configure_logging(): called once by the CLI, never at import. Keeps API keys out of logs."""

from __future__ import annotations

import logging
import sys

from ccm.server.auth import RedactTokens


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers[:] = []
        log.propagate = True
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
