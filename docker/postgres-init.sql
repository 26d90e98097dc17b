-- The Iceberg SQL catalog lives in its own database on the same PostgreSQL.
CREATE DATABASE iceberg OWNER airflow;
