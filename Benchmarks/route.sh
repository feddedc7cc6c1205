#!/usr/bin/env bash
# Route benchmark (issue: operation layer). Measures, in ONE run, against the same trivial fast HTTP backend
# (nginx answering a fixed 2-byte body, so the network path is what is measured), at 1, 16 and 64 connections:
#   (a) the backend directly
#   (b) through nginx as a reverse proxy (keep-alive upstream)
#   (c) through EdgeMatrix: router -> compute node -> backend (pass-through /v1/apps/bench/)
# and prints req/s, p50 and p99 for each, and the ratios (c)/(b) and (c)-(a).
# Usage: Benchmarks/route.sh [DURATION_SECONDS]   (needs nginx and wrk; installs them from Debian if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  echo "installing nginx and wrk..."
  (apt-get install -y nginx-light wrk >/dev/null 2>&1) || (apt-get update >/dev/null && apt-get install -y nginx-light wrk >/dev/null)
fi
EMC="${EMC_BIN:-}"
if [ -z "$EMC" ]; then
  echo "building emc (release)..."
  swift build -c release --product emc --scratch-path .build-release >/dev/null
  EMC=.build-release/release/emc
fi
WORK="$(mktemp -d /tmp/emc-bench-route.XXXXXX)"
BACKEND_PORT=18901; PROXY_PORT=18902; HTTP_PORT=18903; TUNNEL_PORT=18904; CHAIN_PORT=18905; P2P_PORT=18906
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 128; }
  server { listen 127.0.0.1:$BACKEND_PORT; location / { default_type text/plain; return 200 "ok"; } }
  server { listen 127.0.0.1:$PROXY_PORT;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
nginx -c "$WORK/nginx.conf"

# A one-validator chain: the router admits only compute nodes registered there.
"$EMC" genesis new --validators 1 --out "$WORK/chain" --base-port $P2P_PORT >/dev/null
LOG_LEVEL=warning "$EMC" node --role validator --genesis "$WORK/chain/genesis.json" --data-dir "$WORK/chain/validator-1" \
  --http-port $CHAIN_PORT --p2p-port $P2P_PORT > "$WORK/validator.log" 2>&1 & pids+=($!)
export EMC_NODE_URL="http://127.0.0.1:$CHAIN_PORT"
for _ in $(seq 1 100); do "$EMC" query status >/dev/null 2>&1 && break; sleep 0.2; done
mkdir -p "$WORK/router" "$WORK/compute"
"$EMC" keys new --data-dir "$WORK/compute" >/dev/null
"$EMC" tx stake bond --role compute --amount 100 --lock-days 7 --key "$WORK/chain/funded.key" >/dev/null
"$EMC" tx node register --role compute --node-key "$WORK/compute/node.key" --key "$WORK/chain/funded.key" >/dev/null
"$EMC" keys new --data-dir "$WORK/router" >/dev/null
ROUTER_KEY=$("$EMC" keys show --data-dir "$WORK/router" | awk '/public key/ {print $3}')
API_KEY=$("$EMC" keys api --data-dir "$WORK/router" --label bench)
cat > "$WORK/compute/config.json" <<JSON
{ "routers": [{ "address": "127.0.0.1:$TUNNEL_PORT", "key": "$ROUTER_KEY" }],
  "max_concurrent": 128,
  "apps": [{ "name": "bench", "kind": "rest", "base_url": "http://127.0.0.1:$BACKEND_PORT" }] }
JSON
LOG_LEVEL=warning "$EMC" node --role router --data-dir "$WORK/router" --http-port $HTTP_PORT --tunnel-port $TUNNEL_PORT --seed 1 --chain "$EMC_NODE_URL" \
  > "$WORK/router.log" 2>&1 & pids+=($!)
sleep 1
LOG_LEVEL=warning "$EMC" node --role compute --config "$WORK/compute/config.json" --data-dir "$WORK/compute" \
  > "$WORK/compute.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do
  if curl -sf -H "Authorization: Bearer $API_KEY" "http://127.0.0.1:$HTTP_PORT/v1/apps/bench/" >/dev/null; then break; fi
  sleep 0.2
done
curl -sf -H "Authorization: Bearer $API_KEY" "http://127.0.0.1:$HTTP_PORT/v1/apps/bench/" >/dev/null || { echo "EdgeMatrix path not up"; cat "$WORK"/*.log; exit 1; }

run() { # name url conns [header]
  local out
  if [ -n "${4:-}" ]; then out=$(wrk -t1 -c "$3" -d "${DURATION}s" --latency -H "$4" "$2"); else out=$(wrk -t1 -c "$3" -d "${DURATION}s" --latency "$2"); fi
  local rps p50 p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  echo "$1 $3 $rps $p50 $p99 ${errors:-none}"
}
to_ms() { # wrk latency like 85.00us / 1.20ms / 1.01s -> ms
  python3 -c "import sys,re; v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)$', v); f={'us':0.001,'ms':1,'s':1000}[m.group(2)]; print(f'{float(m.group(1))*f:.3f}')" "$1"
}
echo "warming up..."
wrk -t1 -c 16 -d 2s -H "Authorization: Bearer $API_KEY" "http://127.0.0.1:$HTTP_PORT/v1/apps/bench/" >/dev/null
results=()
for c in 1 16 64; do
  results+=("$(run a-direct "http://127.0.0.1:$BACKEND_PORT/" $c)")
  results+=("$(run b-nginx "http://127.0.0.1:$PROXY_PORT/" $c)")
  results+=("$(run c-edgematrix "http://127.0.0.1:$HTTP_PORT/v1/apps/bench/" $c "Authorization: Bearer $API_KEY")")
done
echo
echo "route benchmark: $(nproc) cores, ${DURATION}s per run, wrk -t1; backend: nginx 'return 200'"
printf "%-14s %5s %12s %10s %10s  %s\n" path conns req/s p50_ms p99_ms errors
for r in "${results[@]}"; do
  set -- $r
  printf "%-14s %5s %12s %10s %10s  %s\n" "$1" "$2" "$3" "$(to_ms "$4")" "$(to_ms "$5")" "${*:6}"
done
echo
for c in 1 16 64; do
  a=$(printf "%s\n" "${results[@]}" | awk -v c=$c '$1=="a-direct" && $2==c')
  b=$(printf "%s\n" "${results[@]}" | awk -v c=$c '$1=="b-nginx" && $2==c')
  e=$(printf "%s\n" "${results[@]}" | awk -v c=$c '$1=="c-edgematrix" && $2==c')
  python3 - "$a" "$b" "$e" "$c" <<'PY'
import re, sys
def ms(v):
    m = re.match(r'([0-9.]+)(us|ms|s)$', v); return float(m.group(1)) * {'us': 0.001, 'ms': 1, 's': 1000}[m.group(2)]
a, b, c = (s.split() for s in sys.argv[1:4]); conns = sys.argv[4]
print(f"conns={conns}: (c)/(b) req/s = {float(c[2]) / float(b[2]):.2f}x (target >= 0.7); "
      f"(c)-(a) p50 = {ms(c[3]) - ms(a[3]):+.3f} ms (target <= 1 ms); (c)-(a) p99 = {ms(c[4]) - ms(a[4]):+.3f} ms")
PY
done
