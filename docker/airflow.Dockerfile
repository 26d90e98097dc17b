# Airflow image: Airflow 3.3.2 + the control plane (plugins/) + what the DAG's Python tasks use
# from the data plane (footers, planning, validation, Iceberg). No torch: model stages run on Ray.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG RAY_VERSION=2.60.0
ARG PROVIDER_CNCF_KUBERNETES_VERSION=10.25.0
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/embeddings/
# Exact versions come from the repository's lock (constraints.txt); no compiler, no cache.
RUN pip install --no-cache-dir -c /opt/embeddings/constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "apache-airflow-providers-cncf-kubernetes==${PROVIDER_CNCF_KUBERNETES_VERSION}" \
        "ray[default]==${RAY_VERSION}" \
        transformers tokenizers pyarrow fsspec s3fs pyiceberg[sql-sqlite,sql-postgres] httpx pyyaml \
        psycopg2-binary asyncpg  # the metadata DB on PostgreSQL: Airflow 3 opens sync and async connections

COPY --chown=airflow:0 ray_jobs /opt/embeddings/ray_jobs
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 include /opt/airflow/include
ENV PYTHONPATH=/opt/embeddings:/opt/airflow/plugins \
    EMB_DEFAULTS_FILE=/opt/airflow/include/multimodal_embeddings.defaults.yaml \
    HF_HUB_OFFLINE=1
USER airflow
