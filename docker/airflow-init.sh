#!/usr/bin/env bash
# One-shot Airflow init (compose service airflow-init; tests/integration/test_compose_native.py runs it
# natively on SQLite): migrate the metadata database, then create the admin of the simple
# auth manager from AIRFLOW_ADMIN_USERNAME / AIRFLOW_ADMIN_PASSWORD by writing its password
# file (the file AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE names, shared with the
# api-server). Re-running it is safe: migrations are idempotent and the file is rewritten.
set -euo pipefail
: "${AIRFLOW_ADMIN_USERNAME:?AIRFLOW_ADMIN_USERNAME must be set (see .env.example)}"
: "${AIRFLOW_ADMIN_PASSWORD:?AIRFLOW_ADMIN_PASSWORD must be set (see .env.example)}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE must be set}"

# .env placeholders and malformed keys stop here, one line each, not in a service later.
python -m meterflow.compose_check airflow-init

airflow db migrate

passwords="$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
mkdir -p "$(dirname "$passwords")"
umask 077
python - "$passwords" <<'PY'
import json, os, sys

path = sys.argv[1]
users = {os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}
with open(path + ".tmp", "w") as out:
    json.dump(users, out)
os.replace(path + ".tmp", path)
PY
echo "airflow-init: database migrated, admin '$AIRFLOW_ADMIN_USERNAME' written to $passwords"
