#!/bin/sh
# The coordinator's entrypoint in the image deploy/build-image.sh makes (compose.yaml's
# `coordinator` service). On the first start it makes the CA and server certificate in
# the data dir (`berth-coordinator init`, names from BERTH_NAMES); on every start it
# copies the CA certificate (never ca.key) to /bootstrap and writes a fresh one-time
# join token for each worker named in BERTH_WORKERS to /bootstrap/tokens/NAME, which
# the workers read from the same volume the first time they start. Then it runs the
# coordinator with /etc/berth/coordinator.toml (deploy/coordinator.toml), as the
# systemd unit does, and BERTH_LEASE_TTL as its lease TTL.
set -eu
data=/var/lib/berth
boot=/bootstrap

if [ ! -e "$data/ca.key" ]; then
    set --
    for n in ${BERTH_NAMES:-coordinator}; do
        set -- "$@" --name "$n"
    done
    berth-coordinator init --data-dir "$data" "$@"
fi

umask 077
mkdir -p "$boot/tokens"
cp "$data/ca.pem" "$boot/ca.pem.tmp"
chmod 0644 "$boot/ca.pem.tmp"
mv "$boot/ca.pem.tmp" "$boot/ca.pem"
for w in ${BERTH_WORKERS:-}; do
    berth-coordinator token create --data-dir "$data" --role worker --ttl "${BERTH_TOKEN_TTL:-1h}" > "$boot/tokens/$w.tmp"
    mv "$boot/tokens/$w.tmp" "$boot/tokens/$w"
done

exec berth-coordinator run --config /etc/berth/coordinator.toml --lease-ttl "${BERTH_LEASE_TTL:-30s}"
