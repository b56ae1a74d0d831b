#!/bin/sh
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d): MLflow's
# basic-auth app keeps its users in a database of its own, beside the tracking database POSTGRES_DB.
set -e  # no -u: the postgres image sources this file when it is not executable
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${MLFLOW_AUTH_DB:-mlflow_auth}\" OWNER \"$POSTGRES_USER\""
