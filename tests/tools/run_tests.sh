#!/usr/bin/env bash
# Runs the test command given as arguments with a PostgreSQL server to test against.
#
# Order of preference: FACEFED_TEST_POSTGRES_URL when set; the server already
# listening on 127.0.0.1:5432 (database `test`, trust auth); otherwise a
# throwaway cluster made with the installed PostgreSQL binaries (Debian package
# `postgresql`), stopped and deleted when the tests end.
# pytest's exit code 5 (no tests collected) is reported as a failure's opposite:
# it is turned into 0 only when FACEFED_ALLOW_NO_TESTS=1.
set -u

throwaway_dir=""

stop_throwaway() {
  if [ -n "$throwaway_dir" ]; then
    "$pg_bin/pg_ctl" -D "$throwaway_dir/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$throwaway_dir"
  fi
}

start_throwaway() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$pg_bin" ]; then
    echo "No PostgreSQL server on 127.0.0.1:5432 and no PostgreSQL binaries:" >&2
    echo "install Debian's 'postgresql' package or set FACEFED_TEST_POSTGRES_URL." >&2
    exit 1
  fi
  throwaway_dir=$(mktemp -d /tmp/facefed-pg.XXXXXX)
  chmod 777 "$throwaway_dir"
  local port=55432
  local as_user=()
  [ "$(id -u)" = "0" ] && as_user=(runuser -u postgres --)
  chown postgres "$throwaway_dir" 2>/dev/null || true
  "${as_user[@]}" "$pg_bin/initdb" -D "$throwaway_dir/data" -U postgres --auth=trust >/dev/null
  "${as_user[@]}" "$pg_bin/pg_ctl" -D "$throwaway_dir/data" -l "$throwaway_dir/log" \
    -o "-h 127.0.0.1 -p $port -k $throwaway_dir" -w start >/dev/null
  "$pg_bin/createdb" -h 127.0.0.1 -p $port -U postgres test
  export FACEFED_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/test"
  trap stop_throwaway EXIT
  echo "Started a throwaway PostgreSQL on 127.0.0.1:$port" >&2
}

if [ -z "${FACEFED_TEST_POSTGRES_URL:-}" ]; then
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    export FACEFED_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
  else
    start_throwaway
  fi
fi

"$@"
status=$?
if [ "$status" = "5" ]; then
  echo "pytest collected no tests." >&2
  [ "${FACEFED_ALLOW_NO_TESTS:-0}" = "1" ] && status=0
fi
exit $status
