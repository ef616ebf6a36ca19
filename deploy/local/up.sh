#!/usr/bin/env bash
# Brings facefed's whole topology up on this machine, without containers, all
# on 127.0.0.1: PostgreSQL, the gallery server, a Flower SuperLink, and two
# sites (a site folder with its settings, plus a SuperNode each).
#
#   deploy/local/up.sh [STATE_DIR]      # default: ./facefed-local
#   source STATE_DIR/env.sh             # FACEFED_SERVER_URL, FLWR_HOME, ...
#   source STATE_DIR/admin-env.sh       # the server's settings: `facefed admin ...`
#   FACEFED_SITE_DIR=... facefed site enroll ...  (see STATE_DIR/site-a/env.sh)
#   deploy/local/down.sh [STATE_DIR]    # stops everything up.sh started
#
# PostgreSQL: FACEFED_DATABASE_URL when set (an existing server; the database
# must exist), else a throwaway cluster made with Debian's PostgreSQL binaries
# under STATE_DIR (its own folder 0700, password logins only). For development
# on a single-user machine: see the README's deploy section. Every wait is bounded; on any failure up.sh stops what it
# started and exits non-zero. Process ids go to STATE_DIR/pids/, logs to
# STATE_DIR/logs/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=$(mkdir -p "${1:-./facefed-local}" && cd "${1:-./facefed-local}" && pwd)
python=${FACEFED_PYTHON:-$repo/.venv/bin/python}
bin_dir=$(dirname "$python")
wait_s=${FACEFED_UP_TIMEOUT_S:-120}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
# Flower starts its helpers (flower-superexec) by name: the venv comes first.
export PATH="$bin_dir:$PATH"
mkdir -p "$state/pids" "$state/logs"

log() { printf '[up] %s\n' "$*" >&2; }

on_error() {
  log "failed; stopping what was started (logs in $state/logs)"
  "$here/down.sh" "$state" || true
  exit 1
}
trap on_error ERR

facefed() { "$python" -c "from facefed.core.cli import main; main()" "$@"; }

free_port() {
  "$python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}

# Starts a background process in its own process group (so that down.sh also
# stops the children it forks, such as Flower's app processes); its pid, which
# is also the group id, goes to pids/NAME.
spawn() {
  local name=$1
  shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 &
  echo $! >"$state/pids/$name"
}

# Waits (bounded) until a TCP port on 127.0.0.1 accepts connections.
wait_port() {
  local name=$1 port=$2 deadline=$((SECONDS + wait_s))
  until "$python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
    if ! kill -0 "$(cat "$state/pids/$name")" 2>/dev/null; then
      log "$name exited; end of its log:"; tail -n 20 "$state/logs/$name.log" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then log "$name not up after ${wait_s}s"; return 1; fi
    sleep 0.3
  done
}

# -- PostgreSQL ------------------------------------------------------------------
if [ -n "${FACEFED_DATABASE_URL:-}" ]; then
  database_url=$FACEFED_DATABASE_URL
  log "using the PostgreSQL at FACEFED_DATABASE_URL"
else
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$pg_bin" ]; then
    log "no FACEFED_DATABASE_URL and no PostgreSQL binaries (Debian package 'postgresql')"
    exit 1
  fi
  pg_port=$(free_port)
  as_user=()
  if [ "$(id -u)" = "0" ]; then as_user=(runuser -u postgres --); fi
  # The cluster's folder, which is also its Unix socket folder, is private to
  # the user running PostgreSQL (0700), and TCP logins need a random password
  # (SCRAM), so other local users cannot reach the database.
  if [ "$(id -u)" = "0" ] && ! runuser -u postgres -- test -x "$state"; then
    log "the postgres user cannot enter $state (a parent folder is private):"
    log "use a state folder it can reach, or set FACEFED_DATABASE_URL"
    exit 1
  fi
  mkdir -p "$state/pg"
  chmod 700 "$state/pg"
  if [ "$(id -u)" = "0" ]; then chown postgres:postgres "$state/pg"; fi
  pg_password=$("$python" -c "import secrets; print(secrets.token_hex(24))")
  (umask 077; printf '%s\n' "$pg_password" >"$state/pg/password")
  if [ "$(id -u)" = "0" ]; then chown postgres:postgres "$state/pg/password"; fi
  "${as_user[@]}" "$pg_bin/initdb" -D "$state/pg/data" -U postgres \
    --auth-local=peer --auth-host=scram-sha-256 --pwfile="$state/pg/password" \
    >"$state/logs/initdb.log" 2>&1
  "${as_user[@]}" "$pg_bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/postgres.log" \
    -o "-h 127.0.0.1 -p $pg_port -k $state/pg" -w -t "$wait_s" start >/dev/null
  echo "$pg_bin" >"$state/pids/postgres.bin"
  PGPASSWORD=$pg_password "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres facefed
  database_url="postgresql+psycopg://postgres:$pg_password@127.0.0.1:$pg_port/facefed"
  log "PostgreSQL on 127.0.0.1:$pg_port"
fi

# -- the gallery server ------------------------------------------------------------
server_home="$state/server"
mkdir -p "$server_home"
umask 077
"$python" -c "import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())" \
  >"$server_home/master.key"
umask 022
server_port=$(free_port)
server_url="http://127.0.0.1:$server_port"
export_server_env() {
  export FACEFED_HOME="$server_home" FACEFED_DATABASE_URL="$database_url" \
    FACEFED_MASTER_KEY_FILE="$server_home/master.key"
}
(export_server_env; spawn server "$python" -c "from facefed.core.cli import main; main()" serve --host 127.0.0.1 --port "$server_port")
wait_port server "$server_port"
log "gallery server at $server_url"

# An admin key, and one site with its own key per site folder, made with
# `facefed admin create-key` (which prints the key once). Keys go to files
# readable by this user only; they are never echoed.
create_key() {  # create_key FILE ARGS...: the key printed by the CLI goes to FILE
  local file=$1
  shift
  (export_server_env; umask 077; facefed admin create-key "$@" 2>>"$state/logs/bootstrap.log" |
    sed -n 's/^api key: *//p' >"$file")
  [ -s "$file" ] || { log "facefed admin create-key $* printed no key"; return 1; }
}
create_key "$state/admin.key" --role admin --name local-admin
for site in site-a site-b; do
  mkdir -p "$state/$site/training"
  create_key "$state/$site/api.key" --role site --site-name "$site" --name "$site agent"
  cat >"$state/$site/env.sh" <<ENV
export FACEFED_SERVER_URL=$server_url
export FACEFED_API_KEY_FILE=$state/$site/api.key
export FACEFED_SITE_DIR=$state/$site
ENV
done

# -- Flower: one SuperLink, a SuperNode per site ----------------------------------
link_port=$(free_port)
spawn superlink "$bin_dir/flower-superlink" --insecure --host 127.0.0.1 --port "$link_port" \
  --disable-runtime-dependency-installation --database "$state/superlink.db"
wait_port superlink "$link_port"
node=0
for site in site-a site-b; do
  node_port=$(free_port)
  spawn "supernode-$site" "$bin_dir/flower-supernode" --insecure \
    --superlink "127.0.0.1:$link_port" --host 127.0.0.1 --port "$node_port" \
    --max-wait-time "$wait_s" \
    --node-config "site-id=\"$site\" site-dir=\"$state/$site/training\" partition-id=$node"
  wait_port "supernode-$site" "$node_port"
  node=$((node + 1))
done
log "Flower SuperLink at 127.0.0.1:$link_port with 2 SuperNodes"

# The `flwr` CLI finds SuperLinks by name in $FLWR_HOME/config.toml.
mkdir -p "$state/flwr"
cat >"$state/flwr/config.toml" <<TOML
[superlink]
default = "facefed-local"

[superlink.facefed-local]
address = "127.0.0.1:$link_port"
insecure = true
TOML

# The gallery needs a protection key and a collection before sites can enroll
# or search: made here as the admin, for the default embedding model (this
# also exports that model to ONNX once, which the sites' first command reuses).
FACEFED_SERVER_URL=$server_url "$python" - "$state/admin.key" <<'PY' 2>>"$state/logs/bootstrap.log"
import sys
from pathlib import Path

from facefed.client.admin import AdminClient
from facefed.models.zoo import load_default_embedder

model = load_default_embedder().metadata
admin_key = Path(sys.argv[1]).read_text(encoding="utf-8").strip()
with AdminClient.connect(api_key=admin_key) as admin:
    admin.create_protection_key("orthonormal-v1")
    admin.create_collection(
        "default", model_id=model.model_id, scheme="orthonormal-v1",
        dim=model.embedding_size,
    )
PY
log "collection 'default' created (scheme orthonormal-v1)"

# env.sh: what every shell of this deployment needs (the server's URL, the
# admin API key file for AdminClient, Flower's config). admin-env.sh: the
# server's own settings, for `facefed admin ...` run on this machine.
cat >"$state/env.sh" <<ENV
export FACEFED_SERVER_URL=$server_url
export FACEFED_LOCAL_ADMIN_KEY_FILE=$state/admin.key
export FACEFED_LOCAL_SUPERLINK=127.0.0.1:$link_port
export FLWR_HOME=$state/flwr
export FACEFED_LOCAL_STATE=$state
ENV
(umask 077; cat >"$state/admin-env.sh" <<ENV
export FACEFED_HOME=$server_home
export FACEFED_DATABASE_URL=$database_url
export FACEFED_KEY_VAULT_URL=sqlite:///$server_home/keyvault.db
export FACEFED_MASTER_KEY_FILE=$server_home/master.key
ENV
)
log "up; source $state/env.sh (admin commands: also $state/admin-env.sh; down: $here/down.sh $state)"
