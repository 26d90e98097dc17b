#!/bin/sh
# The Iceberg SQL catalog lives in its own database, owned by its own role (not Airflow's):
# the catalog connection's credentials reach only the catalog.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v pw="$ICEBERG_DB_PASSWORD" <<'SQL'
CREATE ROLE iceberg LOGIN PASSWORD :'pw';
CREATE DATABASE iceberg OWNER iceberg;
SQL
