#!/bin/sh
# Entry point of the MLflow server image: write the basic-auth config from the environment, then run the
# command (the `mlflow server ...` line of docker/compose.yaml). The config holds no secret: the admin
# password comes from MLFLOW_AUTH_ADMIN_PASSWORD (read by MLflow itself, used once to create the admin)
# and the database password from PGPASSWORD (read by libpq), so neither is in a file, a URI or `ps`.
set -eu

if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    : "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the users database, postgresql://user@host/db)}"
    MLFLOW_AUTH_CONFIG_PATH="${HOME:-/tmp}/basic_auth.ini"
    umask 077
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
INI
    export MLFLOW_AUTH_CONFIG_PATH
fi

exec "$@"
