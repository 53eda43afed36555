"""Process environment defaults: no telemetry, no hub access, Prefect state kept in the project.

Called by the CLI (before Prefect or MLflow are imported) and by the test suite. Explicit
environment settings always win (``setdefault``).
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_UI_ENABLED": "false",
    # Run logs at INFO reach the Prefect API (the UI shows every stage's progress); the console handler
    # prints only warnings and errors: the console's stage lines come from the flow itself.
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def configure_environment(project_root: str | Path | None = None) -> None:
    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    root = Path(project_root) if project_root else Path.cwd()
    os.environ.setdefault("PREFECT_HOME", str((root / ".prefect").resolve()))
    try:  # quiet the "Writing model shards" bars of save_pretrained
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return
