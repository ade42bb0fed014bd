"""A readable console for long runs: our progress on screen, everything else in a log file.

Ray, opacus and transformers print many repeated warnings, and every model load its own
progress bar. While a run is quiet, file descriptors 1 and 2 (this process and the Ray
workers it forwards) go to RUN_DIR/log.txt; log records written by privdistill's own
modules (server/, client/, simulations/) are also shown on the original terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

_OURS = tuple(str(Path(__file__).resolve().parents[1] / part) for part in ("server", "client", "simulations"))


class _OwnRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.pathname.startswith(_OURS)


@contextlib.contextmanager
def quiet_console(log_path: Path):
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
    handler = logging.StreamHandler(terminal)
    handler.addFilter(_OwnRecords())
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logger = logging.getLogger("flwr")
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    logger.addHandler(handler)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" and friends, once per save/load
    try:
        yield terminal
    finally:
        logger.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()
