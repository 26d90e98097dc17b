#!/bin/sh
# Refuses to start the stack with placeholder or weak secrets (docker-compose.yaml runs this
# first; every other service waits for it to succeed). POSIX sh: runs in any image.
# Each variable named below must be set, must not be a `change-me` placeholder from
# .env.example, must be at least 16 characters long, and must hold only letters, digits and
# ._~- (the values are spliced into connection JSON and URLs; `openssl rand -hex 24` fits).
status=0
for name in POSTGRES_PASSWORD ICEBERG_DB_PASSWORD MINIO_ROOT_PASSWORD RAY_AUTH_TOKEN AIRFLOW_ADMIN_PASSWORD AIRFLOW_JWT_SECRET; do
    eval "value=\${$name:-}"
    case "$value" in
        "") echo "preflight: $name is not set (copy .env.example to .env and set it)" >&2; status=1 ;;
        change-me*|changeme*|*placeholder*) echo "preflight: $name still holds the .env.example placeholder" >&2; status=1 ;;
        *[!A-Za-z0-9._~-]*) echo "preflight: $name may hold only letters, digits and ._~-" >&2; status=1 ;;
        *)
            if [ "${#value}" -lt 16 ]; then
                echo "preflight: $name is shorter than 16 characters" >&2; status=1
            fi ;;
    esac
done
if [ "$status" -eq 0 ]; then echo "preflight: secrets set"; fi
exit "$status"
