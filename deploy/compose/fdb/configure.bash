#!/usr/bin/env bash
# One-shot: make the new single-process FoundationDB a database ("configure new single ssd") on first
# start, and exit 0 once it is available. On every later start the database already exists, so this
# only waits for it. Bounded: gives up (exit 1) if the server does not answer within about 2 minutes.
set -uo pipefail
cluster_file="${FDB_CLUSTER_FILE:?}"

status() { fdbcli -C "$cluster_file" --exec "status minimal" --timeout 5 2>/dev/null; }

for _ in $(seq 60); do
  state="$(status)"
  case "$state" in
    *"The database is available"*)
      echo "FoundationDB is available"; exit 0 ;;
    *"unavailable"*|*"not configured"*|*"No cluster"*)
      # A fresh server answers "unavailable" until it is configured; "already exists" on a retry after a
      # configure that did land is fine.
      fdbcli -C "$cluster_file" --exec "configure new single ssd" --timeout 30 || true ;;
  esac
  sleep 2
done
echo "FoundationDB did not become available" >&2
exit 1
