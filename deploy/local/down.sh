#!/usr/bin/env bash
# Stops everything deploy/local/up.sh started in STATE_DIR (default
# ./facefed-local): the SuperNodes, the SuperLink, the server, then PostgreSQL.
# Each process gets SIGTERM, then SIGKILL after 10 s. Safe to run twice.
set -uo pipefail

state=${1:-./facefed-local}
[ -d "$state/pids" ] || exit 0

stop_pid() {
  local name=$1 pid
  pid=$(cat "$state/pids/$name" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    # The pid is its process group's id (up.sh starts each with setsid).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      printf '[down] %s ignored SIGTERM; killing it\n' "$name" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$state/pids/$name"
}

for name in supernode-site-a supernode-site-b superlink server; do
  stop_pid "$name"
done

if [ -f "$state/pids/postgres.bin" ]; then
  pg_bin=$(cat "$state/pids/postgres.bin")
  as_user=()
  if [ "$(id -u)" = "0" ]; then as_user=(runuser -u postgres --); fi
  "${as_user[@]}" "$pg_bin/pg_ctl" -D "$state/pg/data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
    "${as_user[@]}" "$pg_bin/pg_ctl" -D "$state/pg/data" -m immediate stop >/dev/null 2>&1
  rm -f "$state/pids/postgres.bin"
fi
printf '[down] stopped everything in %s\n' "$state" >&2
