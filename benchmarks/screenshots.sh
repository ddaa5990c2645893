#!/usr/bin/env bash
# What a person sees of a finished run, as PNGs taken in headless Chromium: report.html, TensorBoard's
# train/loss time series and optuna-dashboard's study page. Both servers listen on 127.0.0.1 only and
# are stopped on exit. Needs `chromium` (Debian) and `pip install tensorboard optuna-dashboard`.
#
#   bash benchmarks/screenshots.sh runs/check48 docs/captures
set -euo pipefail
RUN=$(realpath "${1:?usage: screenshots.sh RUN_DIR [OUT_DIR]}")
OUT=$(realpath -m "${2:-$RUN/screenshots}")
mkdir -p "$OUT"
pids=()
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
TB_PORT=$(free_port) OD_PORT=$(free_port)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

shot() {  # shot URL FILE WIDTH HEIGHT: let the page's scripts run 20 s of virtual time, then capture
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$3,$4" \
    --virtual-time-budget=20000 --screenshot="$OUT/$2" "$1" >/dev/null 2>&1
  echo "$OUT/$2"
}

wait_for() {  # wait_for PORT: until something answers on 127.0.0.1:PORT (60 s at most)
  for _ in $(seq 120); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.5
  done
  echo "nothing answered on 127.0.0.1:$1" >&2
  return 1
}

shot "file://$RUN/report.html" report-html.png 1280 2400

tensorboard --logdir "$RUN/tensorboard" --host 127.0.0.1 --port "$TB_PORT" >/dev/null 2>&1 &
pids+=($!)
wait_for "$TB_PORT"
shot "http://127.0.0.1:$TB_PORT/?tagFilter=train%2Floss#timeseries" tensorboard-train-loss.png 1400 1000

optuna-dashboard --host 127.0.0.1 --port "$OD_PORT" "$RUN/optuna.journal" >/dev/null 2>&1 &
pids+=($!)
wait_for "$OD_PORT"
shot "http://127.0.0.1:$OD_PORT/dashboard/studies/0" optuna-dashboard-study.png 1400 1100
shot "http://127.0.0.1:$OD_PORT/dashboard/studies/0/trials" optuna-dashboard-trials.png 1400 1100
