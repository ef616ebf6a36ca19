#!/usr/bin/env bash
# Starts a site's SuperNode: TLS to the SuperLink, ed25519 node key, site folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${SUPERLINK:?set SUPERLINK=host:port}" "${SITE_DIR:?set SITE_DIR}" "${SITE_KEY:?set SITE_KEY}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
exec flower-supernode \
  --superlink "$SUPERLINK" \
  --root-certificates "${CA_CERT:-$here/certs/ca.crt}" \
  --auth-supernode-private-key "$SITE_KEY" \
  --node-config "site-dir=\"$SITE_DIR\" site-id=\"${SITE_ID:-$(basename "$SITE_DIR")}\"" \
  --port "${SUPERNODE_PORT:-9094}"
