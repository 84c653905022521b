#!/usr/bin/env bash
# Build the image, start the six components in containers (deploy/compose.yaml), send one chat
# request to the OpenAI API, print the reply, and stop everything again.
#
#   ./run_demo.sh                          # one worker
#   ./run_demo.sh 3                        # three workers
#   COMPOSE=podman-compose ./run_demo.sh   # another Compose than Docker's
#   BUILD=0 ./run_demo.sh                  # use the image built before (modkit:latest)
#   MODKIT_BASE_IMAGE=localhost/debian-python:bookworm ./run_demo.sh   # a local base (Dockerfile)
set -euo pipefail
cd "$(dirname "$0")"

workers=${1:-1}
if ! [[ $workers =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [NUM_WORKERS]   (a whole number, 1 or more; got '$workers')" >&2
    exit 2
fi
read -r -a compose <<<"${COMPOSE:-docker compose}"
compose+=(-f deploy/compose.yaml)
url=http://127.0.0.1:8001
export MODKIT_NUM_WORKERS=$workers  # the config's num_workers and the worker service's scale

stop() {
    echo "stopping ..."
    "${compose[@]}" down --volumes --timeout 30 >/dev/null 2>&1 || true
}
trap stop EXIT

if [[ ${BUILD:-1} != 0 ]]; then
    "${compose[@]}" build
fi
"${compose[@]}" up --detach
echo "waiting for $url/health (the workers load the model first) ..."
deadline=$((SECONDS + 300))
until curl -fsS "$url/health" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
        echo "the frontend did not answer /health within 300 s; the last lines of each log:" >&2
        "${compose[@]}" logs --tail 20 >&2 || true
        exit 1
    fi
    sleep 1
done

model=$(curl -fsS --max-time 30 "$url/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
request=$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "temperature": 0, "max_tokens": 32,
    "messages": [{"role": "user", "content": "Hello!"}]}))' "$model")
echo "POST $url/v1/chat/completions  (model $model, $workers worker(s))"
curl -fsS --max-time 120 "$url/v1/chat/completions" -H "Content-Type: application/json" -d "$request" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
