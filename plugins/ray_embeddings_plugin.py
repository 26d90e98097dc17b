"""Registers the control plane's operator extra link with Airflow (plugins/ is on sys.path)."""

from airflow.plugins_manager import AirflowPlugin

from ray_embeddings.links import RayJobLink


class RayEmbeddingsPlugin(AirflowPlugin):
    name = "ray_embeddings"
    operator_extra_links = [RayJobLink()]  # noqa: RUF012 - the AirflowPlugin API is a list
