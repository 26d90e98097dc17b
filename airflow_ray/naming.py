"""Deterministic names for everything a retry must find again.

A retried setup adopts the cluster it made; a retried submit adopts its job. Names are
derived from (dag_id, run_id[, partition]) only, never from time or randomness.
"""

from __future__ import annotations

import hashlib
import re

_DNS_SAFE = re.compile(r"[^a-z0-9-]+")


def _digest(*parts: object, length: int = 10) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:length]


def cluster_name(dag_id: str, run_id: str, prefix: str = "emb") -> str:
    """A Kubernetes-safe (RFC 1123, <= 40 chars) RayCluster name for one DAG run."""
    slug = _DNS_SAFE.sub("-", dag_id.lower()).strip("-")[:20].strip("-") or "dag"
    return f"{prefix}-{slug}-{_digest(dag_id, run_id)}"


def submission_id(dag_id: str, run_id: str, partition: int | str, attempt: int = 0) -> str:
    """The Ray job submission id of one partition (the job's key) of one DAG run.

    ``attempt`` increments only when an earlier job under the previous id ended FAILED or
    STOPPED, so a resubmission is still deterministic and never collides.
    """
    base = f"emb-{_digest(dag_id, run_id, partition, length=16)}-p{partition}"
    return base if attempt == 0 else f"{base}-r{attempt}"
