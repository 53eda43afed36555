#!/usr/bin/env bash
# Main job from a fresh clone: set-up time, then `retrain` on the simulator (the README command),
# split into core stage time, orchestration inside the flow, and start-up outside it.
#   bash benchmarks/main_job.sh [OUT_JSON]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$REPO/benchmarks/work/main_job.json}")
DIR=$(mktemp -d /tmp/asft-fresh-XXXX)
git clone -q "$REPO" "$DIR/repo"
cd "$DIR/repo"
t0=$(date +%s.%N); bash scripts/setup.sh; t1=$(date +%s.%N)
OUTPUT=runs/simulator bash scripts/retrain.sh > retrain.log 2>&1; t2=$(date +%s.%N)
.venv/bin/python - "$t0" "$t1" "$t2" "$OUT" <<'PY'
import json, sys, os, datetime, platform
t0, t1, t2, out = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
m = json.load(open("runs/simulator/metrics.json"))
wall = t2 - t1
core = sum(m["core_seconds"].values())
flow = m["timings_s"]["flow_total"]
res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{platform.platform()}, {os.cpu_count()} cpus", "setup_s": t1 - t0, "retrain_wall_s": wall,
       "flow_total_s": flow, "core_stage_s": core, "orchestration_in_flow_s": flow - core,
       "startup_outside_flow_s": wall - flow, "prefect_mlflow_share": (wall - core) / wall,
       "stages_core_s": m["core_seconds"], "stages_task_s": m["timings_s"],
       "base_test": m["models"]["base"]["test"], "base_train": m["models"]["base"]["train"]}
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
PY
