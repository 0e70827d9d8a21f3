#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests on 127.0.0.1 and a free port, with
# wal_level = logical and SCRAM passwords; sourced by tests/run.sh, which stops it on exit.
# Installs Debian's server when no server binaries are present (idempotent).
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
  pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi
pg_dir="$(mktemp -d "${TMPDIR:-/tmp}/sluice-pg.XXXXXX")"
pg_port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
pg_password="sluice-test-only"
# initdb refuses to run as root: run the server as the postgres user when we are root.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  as_pg=(runuser -u postgres --)
  chown postgres "$pg_dir"
fi
echo "$pg_password" >"$pg_dir/pwfile"
"${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --pwfile="$pg_dir/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$pg_dir/initdb.log" 2>&1
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 start -o \
  "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$pg_dir -c wal_level=logical \
   -c max_replication_slots=32 -c max_wal_senders=32 -c fsync=off -c synchronous_commit=off \
   -c full_page_writes=off -c max_connections=200" >/dev/null
stop_postgres() {
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
export SLUICE_PG_HOST=127.0.0.1 SLUICE_PG_PORT="$pg_port" SLUICE_PG_USER=postgres \
  SLUICE_PG_PASSWORD="$pg_password" SLUICE_PG_BIN="$pg_bin"
