#!/usr/bin/env bash
# The suite on a loaded machine: it runs RUNS times in a row (each in a random order:
# pytest-randomly) while a second full suite keeps running beside it on the same cores.
# Exit 0 only if every foreground run passed. `make test-loaded` runs it. The load is
# stopped by its process ids: the loop, then its pytest with SIGINT (so that pytest stops
# the Azurite and hosts it started).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PYTEST=.venv/bin/pytest
logs=$(mktemp -d)
loop() {
    while true; do
        "$PYTEST" -q -p no:cacheprovider >>"$logs/load.log" 2>&1 &
        echo $! >"$logs/load.pid"
        wait $!
    done
}
loop &
loop_pid=$!
stop_load() {
    kill "$loop_pid" 2>/dev/null
    wait "$loop_pid" 2>/dev/null
    if [ -s "$logs/load.pid" ]; then
        pid=$(cat "$logs/load.pid")
        kill -INT "$pid" 2>/dev/null
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$pid" 2>/dev/null
    fi
}
trap stop_load EXIT
failed=0
for run in $(seq 1 "$RUNS"); do
    started=$(date +%s)
    if "$PYTEST" -q -p no:cacheprovider >"$logs/run-$run.log" 2>&1; then verdict=passed; else verdict=FAILED; failed=1; fi
    summary=$(tail -1 "$logs/run-$run.log")
    seed=$(grep -o "randomly-seed=[0-9]*" "$logs/run-$run.log" | head -1)
    echo "run $run of $RUNS beside a running suite: $verdict in $(( $(date +%s) - started )) s, $seed ($summary)"
done
echo "logs in $logs"
exit $failed
