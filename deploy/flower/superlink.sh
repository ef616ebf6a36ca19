#!/usr/bin/env bash
# Starts the SuperLink with TLS, SuperNode authentication and no runtime installs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
certs="${CERTS:-$here/certs}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" \
  --ssl-certfile "$certs/server.crt" \
  --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "${SUPERLINK_DB:-$here/superlink.db}" \
  --host "${SUPERLINK_HOST:-127.0.0.1}" --port "${SUPERLINK_PORT:-9091}"
