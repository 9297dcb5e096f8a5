#!/usr/bin/env bash
# Stops the server started by scripts/start_mysql.sh; `--purge` also deletes its data directory.
set -euo pipefail

dir="${HPL_MYSQL_DIR:-/tmp/hpl-mysql}"
pidfile="$dir/mysqld.pid"

if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  for _ in $(seq 1 120); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[stop_mysql] server $pid did not stop within 60 s" >&2
    exit 1
  fi
  echo "[stop_mysql] stopped server $pid" >&2
else
  echo "[stop_mysql] no server running for $dir" >&2
fi
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$dir"
  echo "[stop_mysql] removed $dir" >&2
fi
