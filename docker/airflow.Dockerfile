# Airflow image: Airflow 3.3.2 + the Ray provider (airflow_ray, installed) + what the DAG's Python tasks use
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

COPY --chown=airflow:0 pyproject.toml /opt/embeddings/
COPY --chown=airflow:0 ray_jobs /opt/embeddings/ray_jobs
COPY --chown=airflow:0 airflow_ray /opt/embeddings/airflow_ray
# Installs the provider's entry point (connection type, extra link) and the data plane's code.
RUN pip install --no-cache-dir --no-deps /opt/embeddings
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 include /opt/airflow/include
ENV PYTHONPATH=/opt/airflow/dags \
    EMB_DEFAULTS_FILE=/opt/airflow/include/multimodal_embeddings.defaults.yaml \
    HF_HUB_OFFLINE=1
USER airflow
