"""The output identity a run writes, and what changed since the dataset's last registered night.

:func:`ray_jobs.contract.ids.output_key` hashes the model id and the settings declared with
``identity=True``. After a night's registration its identity is recorded beside the dataset's
lineage (``runs/_identity/<dataset>.json``), so the next run's input check can say, before
anything runs, that a changed dtype or image limit starts a new table and embeds every row.
The record lives in ``runs/_identity/<dataset>.json``, apart from the lineage pointers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ray_jobs import storage
from ray_jobs.config.declare import identity_of
from ray_jobs.contract.ids import output_key
from ray_jobs.contract.layout import identity_uri


@dataclass(frozen=True)
class OutputIdentity:
    model_id: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, model_id: str, *groups) -> OutputIdentity:
        """The identity of *model_id* run with the settings *groups* (stage and job settings)."""
        return cls(model_id, identity_of(*groups))

    @property
    def key(self) -> str:
        return output_key(self.model_id, self.settings)

    def describe(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"model {self.model_id}, {values}"

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "settings": dict(self.settings), "output_key": self.key}


def record_output(output_uri: str, dataset: str, identity: OutputIdentity, table: str, run_id: str) -> None:
    """Remember *identity* as what the dataset's table was last registered with."""
    storage.write_text(
        identity_uri(output_uri, dataset), json.dumps({**identity.to_dict(), "table": table, "run_id": run_id})
    )


def last_output(output_uri: str, dataset: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(identity_uri(output_uri, dataset)))
    except (FileNotFoundError, ValueError):
        return None


def change_note(identity: OutputIdentity, last: dict[str, Any] | None) -> str:
    """One line on what this run's identity means for the dataset: the same as last night
    (committed work is reused), or different (a new table, every row embedded)."""
    if last is None:
        return f"output identity {identity.key} ({identity.describe()}): first registered night of this dataset"
    if last.get("output_key") == identity.key:
        return f"output identity {identity.key} ({identity.describe()}): as last night (run {last.get('run_id')})"
    before = {"model_id": last.get("model_id"), **(last.get("settings") or {})}
    now = {"model_id": identity.model_id, **identity.settings}
    changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in sorted(now.items()) if before.get(k) != v)
    return (
        f"output identity {identity.key} differs from last night's {last.get('output_key')} "
        f"({changed or 'settings changed'}): this run starts a new table and embeds every row; "
        f"last night's table {last.get('table')} is left as it is"
    )
