#!/usr/bin/env bash
# Starts a private MariaDB (or MySQL 8) server for InterCode-SQL and loads the Spider dump once.
#
# Idempotent: installs mariadb-server if no server binary exists (needs root + apt), initialises a data directory
# under $HPL_MYSQL_DIR, starts the server unless it already runs, loads the dump unless a marker says it was loaded.
# Configured like InterCode's MySQL 8 container: lower_case_table_names=1 (and MySQL 8's sql_mode, see below).
# Logs go to stderr; the only stdout line is the URL for --db-url (e.g. mysql://admin:admin@127.0.0.1:3307).
#
# Environment: HPL_MYSQL_DIR (default /tmp/hpl-mysql), HPL_MYSQL_PORT (default 3307),
#              HPL_MYSQL_DUMP (default <repo>/../shared/data/intercode_sql/ic_spider_dbs.sql).
# Stop with scripts/stop_mysql.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${HPL_MYSQL_DIR:-/tmp/hpl-mysql}"
port="${HPL_MYSQL_PORT:-3307}"
dump="${HPL_MYSQL_DUMP:-$repo/../shared/data/intercode_sql/ic_spider_dbs.sql}"
sock="$dir/mysqld.sock"
url="mysql://admin:admin@127.0.0.1:$port"
# MySQL 8's default without ONLY_FULL_GROUP_BY, which MariaDB applies without MySQL 8's functional-dependency rules
# (see SQL_MODE in hpl_lightning/envs/intercode_sql.py; the env also sets it per session).
sql_mode="STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"

log() { echo "[start_mysql] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

find_bin() {  # first existing command among the arguments (also looks in sbin, which root-less PATHs lack)
  local name
  for name in "$@"; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    if [ -x "/usr/sbin/$name" ]; then echo "/usr/sbin/$name"; return 0; fi
  done
  return 1
}

server="$(find_bin mariadbd mysqld || true)"
if [ -z "$server" ]; then
  [ "$(id -u)" = 0 ] || die "no mariadbd/mysqld found; install mariadb-server (needs root)"
  log "installing mariadb-server with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client >&2
  server="$(find_bin mariadbd mysqld)" || die "mariadb-server installed but no server binary found"
fi
client="$(find_bin mariadb mysql)" || die "no mariadb/mysql client found"
admin="$(find_bin mariadb-admin mysqladmin)" || die "no mariadb-admin/mysqladmin found"
[ -r "$dump" ] || die "dump not readable: $dump (set HPL_MYSQL_DUMP)"

mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9  # concurrent callers (parallel test sessions) wait for the first one

run_as=root
if [ "$(id -u)" = 0 ]; then
  if id mysql >/dev/null 2>&1; then run_as=mysql; fi
else
  run_as="$(id -un)"
fi

cat >"$dir/my.cnf.new" <<EOF
[mysqld]
user=$run_as
datadir=$dir/data
socket=$sock
pid-file=$dir/mysqld.pid
log-error=$dir/error.log
port=$port
bind-address=127.0.0.1
skip-name-resolve
lower_case_table_names=1
sql_mode=$sql_mode
character-set-server=utf8mb4
collation-server=utf8mb4_general_ci
max_connections=500
innodb_buffer_pool_size=256M
innodb_flush_log_at_trx_commit=2
EOF

if [ -f "$dir/my.cnf" ] && ! cmp -s "$dir/my.cnf" "$dir/my.cnf.new" && [ -f "$dir/mysqld.pid" ]; then
  log "WARNING: configuration changed; a running server keeps the old one until scripts/stop_mysql.sh + restart"
fi
mv "$dir/my.cnf.new" "$dir/my.cnf"

ping() { "$admin" --no-defaults --socket="$sock" -u root ping >/dev/null 2>&1; }
sql() { "$client" --no-defaults --socket="$sock" -u root "$@"; }

if ping; then
  log "server already running on $sock"
else
  if [ -f "$dir/mysqld.pid" ] && kill -0 "$(cat "$dir/mysqld.pid")" 2>/dev/null; then
    die "a server process $(cat "$dir/mysqld.pid") owns $dir but does not answer; see $dir/error.log"
  fi
  if [ ! -d "$dir/data/mysql" ]; then
    log "initialising data directory $dir/data"
    rm -rf "$dir/data" "$dir/.loaded"
    mkdir -p "$dir/data"
    chown -R "$run_as" "$dir"
    if "$server" --version | grep -qi mariadb; then
      installer="$(find_bin mariadb-install-db mysql_install_db)" || die "no mariadb-install-db found"
      "$installer" --defaults-file="$dir/my.cnf" --auth-root-authentication-method=socket --skip-test-db >&2
    else
      "$server" --defaults-file="$dir/my.cnf" --initialize-insecure >&2
    fi
  fi
  chown -R "$run_as" "$dir"
  log "starting $server on 127.0.0.1:$port"
  nohup "$server" --defaults-file="$dir/my.cnf" >/dev/null 2>&1 9>&- &  # 9>&-: the server must not hold the lock
  for _ in $(seq 1 120); do
    ping && break
    kill -0 $! 2>/dev/null || die "server exited while starting; see $dir/error.log"
    sleep 0.5
  done
  ping || die "server did not answer within 60 s; see $dir/error.log"
  if [ -d "$dir/data/mysql" ] && [ -f "$dir/.loaded" ]; then
    # No episode survives a restart: drop the users and copies that killed processes left behind.
    sql -N -e "SELECT CONCAT('DROP DATABASE \`', SCHEMA_NAME, '\`;') FROM information_schema.SCHEMATA
                 WHERE SCHEMA_NAME LIKE 'hplep\\_%';
               SELECT CONCAT('DROP USER \`', User, '\`@\`', Host, '\`;') FROM mysql.user
                 WHERE User LIKE 'hplep\\_%';" | sql
  fi
fi

# Content, not path or mtime: CI loads the same dump from a copy of shared/ in another folder.
stamp="$(sha256sum <"$dump" | cut -d' ' -f1)"
if [ "$(cat "$dir/.loaded" 2>/dev/null || true)" != "$stamp" ]; then
  log "loading $dump"
  # The dump creates admin@% itself; drop it first so a re-load after a failed one does not stop there.
  sql -e "DROP USER IF EXISTS 'admin'@'%';"
  # Reloading over loaded databases drops tables that others reference: foreign key checks off for the load.
  { echo "SET FOREIGN_KEY_CHECKS=0;"; cat "$dump"; } | sql
  # The env creates a restricted user per episode, which needs GRANT OPTION; anonymous users would shadow them.
  sql -e "GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION;
          DELETE FROM mysql.global_priv WHERE User='';
          FLUSH PRIVILEGES;"
  echo "$stamp" >"$dir/.loaded"
  log "loaded"
fi
echo "$url"
