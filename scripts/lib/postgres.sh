# Sourced by the benchmark scripts: a throwaway PostgreSQL server of Debian's `postgresql`
# package (installed if missing), in a directory of its own on a free loopback port, with the
# server's defaults for durability (fsync on, synchronous_commit on): what tollgate's
# "nothing acknowledged is lost" needs of a single server.
#
#   pg_start            # sets pg_dir, pg_port, pg_url (of database `postgres`)
#   pg_fresh_db NAME    # drops and creates NAME; prints its URL
#   pg_stop [LOG]       # stops the server, keeps its log in LOG if given, and removes its
#                       # directory (call from a trap)
#
# initdb refuses to run as root: as root, the server runs as the `postgres` user the package
# creates.

pg_dir=""
pg_port=""
pg_url=""
pg_run=()
pg_bin=""

pg_start() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
    echo "PostgreSQL not found: installing Debian's postgresql" >&2
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y postgresql
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  fi
  pg_dir=$(mktemp -d /tmp/tollgate-bench-pg.XXXXXX)
  pg_run=()
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$pg_dir"
    pg_run=(runuser -u postgres --)
  fi
  "${pg_run[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U tollgate --auth=trust -E UTF8 \
    >"$pg_dir/initdb.log" 2>&1 || { cat "$pg_dir/initdb.log" >&2; return 1; }
  pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${pg_run[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=200" \
    -w -t 60 start >/dev/null || { cat "$pg_dir/log" >&2; return 1; }
  pg_url="postgres://tollgate@127.0.0.1:$pg_port/postgres"
}

pg_sql() {
  "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U tollgate -X -q -A -t -v ON_ERROR_STOP=1 \
    -d "${2:-postgres}" -c "$1"
}

pg_fresh_db() {
  pg_sql "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
  pg_sql "CREATE DATABASE $1" >/dev/null
  echo "postgres://tollgate@127.0.0.1:$pg_port/$1"
}

pg_stop() {
  [ -n "$pg_dir" ] || return 0
  "${pg_run[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  [ -n "${1:-}" ] && cp "$pg_dir/log" "$1" 2>/dev/null
  rm -rf "$pg_dir"
  pg_dir=""
}
