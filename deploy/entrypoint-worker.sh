#!/bin/sh
# A worker's entrypoint in the image deploy/build-image.sh makes (compose.yaml's
# `worker-N` services). It waits for the coordinator's CA certificate in /bootstrap
# and, until this worker has enrolled (its certificate is in the work dir), for its
# join token /bootstrap/tokens/$BERTH_NAME; then it runs berth-worker with the flags
# of deploy/berth-worker.service, the same variables as deploy/worker.env, and
# --name $BERTH_NAME.
set -eu
work=/var/lib/berth-worker
boot=/bootstrap
name=${BERTH_NAME:?BERTH_NAME must name this worker}

# Waits up to 60 s for a file; the container's restart policy tries again after.
wait_for() {
    i=0
    while [ ! -s "$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then
            echo "entrypoint-worker: $1 did not appear within 60s: is the coordinator up?" >&2
            exit 1
        fi
        sleep 0.2
    done
}

wait_for "$boot/ca.pem"
if [ ! -e "$work/worker.pem" ]; then
    wait_for "$boot/tokens/$name"
    BERTH_JOIN_TOKEN=$(cat "$boot/tokens/$name")
    export BERTH_JOIN_TOKEN
fi

# $BERTH_WORKER_ARGS is split at spaces on purpose, as in the systemd unit.
# shellcheck disable=SC2086
exec berth-worker \
    --coordinator "${BERTH_COORDINATOR:-coordinator:7447}" \
    --ca "$boot/ca.pem" \
    --work-dir "$work" \
    --slots "${BERTH_SLOTS:-2}" \
    --pool "${BERTH_POOL:-default}" \
    --name "$name" \
    ${BERTH_WORKER_ARGS:-}
