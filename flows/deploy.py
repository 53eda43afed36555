"""Create the Prefect deployments defined in ``prefect.yaml`` (one definition of the schedule and pools).

``prefect deploy --all`` reads the same file; this module does it from code so a deployment can point
at another work pool or source checkout (``asft deploy --pool NAME``), e.g. in tests or a staging
server. The flow code is pulled from ``source`` (a checkout of this repository) by process workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"


def deployment_specs(path: str | Path = PREFECT_YAML) -> dict[str, dict]:
    doc = yaml.safe_load(Path(path).read_text())
    return {d["name"]: d for d in doc.get("deployments") or []}


def deploy(name: str = "retrain-weekly", work_pool: str | None = None, source: str | Path = REPO,
           parameters: dict[str, Any] | None = None, job_variables: dict[str, Any] | None = None,
           schedule_active: bool | None = None, path: str | Path = PREFECT_YAML) -> str:
    """Create or update deployment ``name`` from ``prefect.yaml``; returns its id."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    specs = deployment_specs(path)
    if name not in specs:
        raise KeyError(f"{path}: no deployment named {name!r}; have {sorted(specs)}")
    spec = specs[name]
    schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"),
                      active=s.get("active", True) if schedule_active is None else schedule_active)
                 for s in spec.get("schedules") or []]
    pool = spec.get("work_pool") or {}
    remote = prefect_flow.from_source(source=str(source), entrypoint=spec["entrypoint"])
    return str(remote.deploy(
        name=name, work_pool_name=work_pool or pool["name"], work_queue_name=pool.get("work_queue_name"),
        parameters={**(spec.get("parameters") or {}), **(parameters or {})},
        job_variables={**(pool.get("job_variables") or {}), **(job_variables or {})},
        schedules=schedules, description=spec.get("description"), tags=spec.get("tags"),
        build=False, push=False, print_next_steps=False))
