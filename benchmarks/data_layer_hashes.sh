#!/bin/bash
# md5 of every output of the data stages (ingest, preprocess, preferences) on the shared datasets and a
# few preprocessing variants, run with the asft of CODE (default: this checkout). Compare two codes with
#   bash benchmarks/data_layer_hashes.sh /work/scale/h-old /work/scale/orig   # an export of an older commit
#   bash benchmarks/data_layer_hashes.sh /work/scale/h-new
#   diff /work/scale/h-old/md5.txt /work/scale/h-new/md5.txt
# (--data simulator is included: it differs whenever the simulator itself changed. Dataset paths are given
# relative to CODE, as `retrain --data ../shared/data/...` would, since source.json and stats.json record them.)
set -u
OUT=$(realpath -m "$1"); ROOT=$(cd "$(dirname "$0")/.." && pwd); CODE=$(realpath "${2:-$ROOT}")
PY="$ROOT/.venv/bin/python"
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
  HF_HUB_OFFLINE=1 GX_ANALYTICS_ENABLED=false PYTHONPATH="$CODE" \
  ASFT_DATA_ROOTS="$(realpath -m "$ROOT/../shared/data")${ASFT_DATA_ROOTS:+:$ASFT_DATA_ROOTS}"
cd "$CODE" || exit 1
asft() { "$PY" -m asft.cli "$@" > "$OUT/log.txt" 2>&1 || { echo "FAILED: asft $*"; tail -5 "$OUT/log.txt"; }; }
rm -rf "$OUT"; mkdir -p "$OUT"
for ds in ml-100k amazon-beauty simulator; do
  case $ds in
    simulator) D=simulator; C=();;
    amazon-beauty) D=$(realpath -m --relative-to="$CODE" "$ROOT/../shared/data/amazon-beauty")
                   C=(--config "$ROOT/configs/amazon-beauty.yaml");;
    *) D=$(realpath -m --relative-to="$CODE" "$ROOT/../shared/data/ml-100k"); C=();;
  esac
  asft ingest --data "$D" "${C[@]}" --output "$OUT/$ds/raw"
  asft preprocess --raw "$OUT/$ds/raw" "${C[@]}" --output "$OUT/$ds/processed"
  asft preferences --raw "$OUT/$ds/raw" --processed "$OUT/$ds/processed" "${C[@]}" --output "$OUT/$ds/preferences"
done
asft preprocess --raw "$OUT/ml-100k/raw" --output "$OUT/variants/kcore" preprocess.user_core=5 preprocess.item_core=10 \
  preprocess.dedupe_consecutive=true preprocess.window_stride=0
asft preprocess --raw "$OUT/amazon-beauty/raw" --output "$OUT/variants/last" preprocess.train_windows=last \
  preprocess.max_len=20
rm -f "$OUT/log.txt"
(cd "$OUT" && find . -type f | sort | xargs md5sum) > "$OUT.md5.txt" && mv "$OUT.md5.txt" "$OUT/md5.txt"
echo "$OUT/md5.txt"
