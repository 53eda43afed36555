#!/usr/bin/env bash
# Regenerate the UI screenshots of docs/SCREENSHOTS.md: a small `retrain` on the simulator against a
# throw-away Prefect server and MLflow SQLite store under $WORK, then headless-Chromium shots of the
# MLflow and Prefect UIs. Run from the repository root: `bash docs/screenshots.sh` (about 3-6 min on 2 CPUs).
#   WORK=/tmp/asft-shots   scratch folder under /tmp (deleted and recreated)
#   OUT=docs               where the PNGs go
#   PREFECT_PORT=4299 MLFLOW_PORT=5299
set -euo pipefail

WORK=${WORK:-/tmp/asft-shots}
OUT=${OUT:-docs}
PREFECT_PORT=${PREFECT_PORT:-4299}
MLFLOW_PORT=${MLFLOW_PORT:-5299}
PY=.venv/bin/python
SHOT="$PY docs/screenshot.py"

export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
  DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 GX_ANALYTICS_ENABLED=false
export PREFECT_HOME=$WORK/prefect ASFT_RUNS_DIR=$WORK/runs
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api   # also what the Prefect UI calls (ui-settings)
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db
PREFECT_UI=http://127.0.0.1:$PREFECT_PORT
MLFLOW_UI=http://127.0.0.1:$MLFLOW_PORT

case "$WORK" in
  /tmp/?*) ;;
  *) echo "WORK must be a folder under /tmp (it is deleted first): $WORK" >&2; exit 2 ;;
esac
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
PIDS=()
cleanup() {  # stop the servers' process groups; MLflow's job workers take a few seconds to exit
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 30); do kill -0 -- "-$p" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_up() {  # URL: wait until it answers (servers take a while on a busy machine)
  for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 3; done
  echo "$1 did not come up" >&2; return 1
}

# 1. Prefect server with its UI, in its own process group.
set -m
PREFECT_UI_ENABLED=true .venv/bin/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" \
  >"$WORK/prefect-server.log" 2>&1 &
PIDS+=($!)
set +m
wait_up "$PREFECT_UI/api/health"

# 2. A small retrain (tiny model and data) tracked to the SQLite store; artifacts go to $WORK/mlartifacts.
.venv/bin/retrain --data simulator --output "$WORK/run1" tracking.mlflow_uri="$MLFLOW_TRACKING_URI" \
  simulator.n_users=60 simulator.n_items=40 simulator.min_len=8 simulator.max_len=16 \
  preprocess.max_len=12 preprocess.window_stride=6 model.n_layer=1 model.n_head=1 model.n_embd=16 \
  train.epochs=2 train.batch_size=16 train.warmup_steps=2 train.device=cpu eval.batch_size=64 \
  preferences.judge.n_judges=4 reward.members=2 reward.train.epochs=2 reward.train.batch_size=32 \
  reward.train.warmup_steps=2 reward.train.device=cpu judge.members=1 sampling.n_candidates=4 \
  posttrain.pg.group_size=4 posttrain.train.epochs=2 posttrain.train.batch_size=16 \
  posttrain.train.warmup_steps=2 posttrain.train.device=cpu | tee "$WORK/retrain.log"

# 3. MLflow UI on the same store.
set -m
.venv/bin/mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --default-artifact-root "file://$WORK/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  >"$WORK/mlflow-server.log" 2>&1 &
PIDS+=($!)
set +m
wait_up "$MLFLOW_UI/health"

# 4. Ids: the latest retrain parent run, its recommender LoggedModel, its Prefect flow run and artifacts.
read -r EXP RUN MODEL FLOW_RUN RAW_DIGEST < <($PY - <<'EOF'
import mlflow
c = mlflow.MlflowClient()
exp = c.get_experiment_by_name("asft-retrain").experiment_id
run = c.search_runs([exp], "tags.kind = 'retrain'", order_by=["attributes.start_time DESC"], max_results=1)[0]
model = next(m for m in c.search_logged_models([exp])
             if m.source_run_id == run.info.run_id and m.name == "recommender")
raw = next(i.dataset for i in run.inputs.dataset_inputs if i.dataset.name == "raw")
print(exp, run.info.run_id, model.model_id, run.data.tags["prefect.flow_run_id"], raw.digest)
EOF
)
artifact_id() {  # KEY: id of the flow run's artifact with that key
  curl -sf -X POST "$PREFECT_API_URL/artifacts/filter" -H 'content-type: application/json' \
    -d "{\"artifacts\": {\"flow_run_id\": {\"any_\": [\"$FLOW_RUN\"]}, \"key\": {\"any_\": [\"$1\"]}}}" |
    $PY -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])'
}
SUMMARY=$(artifact_id retrain-summary)
METHODS=$(artifact_id posttrain-methods)
echo "experiment $EXP, run $RUN, model $MODEL, flow run $FLOW_RUN, raw dataset $RAW_DIGEST"

# 5. MLflow screenshots (machine-learning view; the Assistant side panel closed).
ML="?workflowType=machine_learning"
CLOSE="document.querySelectorAll('button[aria-label=Close]').forEach(b => b.click())"
$SHOT "$MLFLOW_UI/#/experiments/$EXP/runs/$RUN$ML" "$OUT/mlflow-run.png" --height 1850 \
  --wait-for "Logged models (" --wait 4 --js "$CLOSE"
$SHOT "$MLFLOW_UI/#/experiments/$EXP/runs/$RUN$ML" "$OUT/mlflow-run-datasets.png" --height 900 \
  --wait-for "Logged models (" --wait 4 --js "$CLOSE" --click "raw ($RAW_DIGEST)"
# the parent run's expand button: the only unlabelled, empty button inside a table row
EXPAND_CHILDREN="(() => { $CLOSE; const b = [...document.querySelectorAll('button')].find(b =>
  !b.getAttribute('aria-label') && !b.textContent.trim() && b.closest('[role=row], .ag-row'));
  if (b) b.click(); })()"
$SHOT "$MLFLOW_UI/#/experiments/$EXP/runs$ML" "$OUT/mlflow-runs-table.png" --height 1200 \
  --wait-for "retrain-" --wait 4 --js "$EXPAND_CHILDREN" --click "Expand rows"
$SHOT "$MLFLOW_UI/#/experiments/$EXP/models$ML" "$OUT/mlflow-models.png" --height 420 \
  --wait-for "recommender" --wait 4 --js "$CLOSE"
$SHOT "$MLFLOW_UI/#/experiments/$EXP/models/$MODEL$ML" "$OUT/mlflow-model.png" --height 1000 \
  --wait-for "Datasets used" --wait 4 --js "$CLOSE"

# 6. Prefect screenshots.
$SHOT "$PREFECT_UI/runs/flow-run/$FLOW_RUN" "$OUT/prefect-flow-run.png" --height 1000 \
  --wait-for "Artifacts" --wait 5
$SHOT "$PREFECT_UI/runs/flow-run/$FLOW_RUN" "$OUT/prefect-artifacts.png" --height 1100 \
  --wait-for "Artifacts" --wait 5 --click "Artifacts"
$SHOT "$PREFECT_UI/artifacts/artifact/$SUMMARY" "$OUT/prefect-retrain-summary.png" --height 700 \
  --wait-for "promotion:" --wait 4
$SHOT "$PREFECT_UI/artifacts/artifact/$METHODS" "$OUT/prefect-posttrain-methods.png" --height 600 \
  --wait-for "coverage@10" --wait 4
