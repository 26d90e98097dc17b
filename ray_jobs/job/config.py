"""One partition job's configuration, and what its pre-flight resolved.

:class:`EmbedConfig` is what ``python -m ray_jobs embed`` parses into: where the rows come
from (a plan's partition, or a whole manifest), the model, and the declared settings groups
(:class:`~ray_jobs.config.settings.StageSettings`, :class:`~ray_jobs.config.settings.JobSettings`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ray_jobs.config.declare import fields_of, from_flat
from ray_jobs.config.settings import JobSettings, StageSettings
from ray_jobs.errors import UsageError
from ray_jobs.job.datasource import FragmentRef
from ray_jobs.job.footprint import Footprint, footprint_of
from ray_jobs.model.stage_spec import StageLayout, StageResources, default_resources

_MODEL_ID = re.compile(r"^[a-z0-9_]{1,200}-[0-9a-f]{10}$")  # contract.make_model_id


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Everything one partition job needs; validated on construction."""

    model_uri: str
    output_uri: str | None = None
    manifest_uri: str | None = None
    plan_uri: str | None = None
    partition: int | None = None
    stage: StageSettings = field(default_factory=StageSettings)
    job: JobSettings = field(default_factory=JobSettings)
    ray_address: str | None = None
    force: bool = False
    model_id: str | None = None  # precomputed once per run (check_inputs); None: computed here (metadata only)

    def __post_init__(self) -> None:
        if self.model_id is not None and not _MODEL_ID.match(self.model_id):
            raise UsageError(
                f"--model-id must look like name-0123456789 (as check_inputs prints it), got {self.model_id!r}"
            )
        if (self.manifest_uri is None) == (self.plan_uri is None):
            raise UsageError("give exactly one of --manifest or --plan")
        if self.plan_uri is not None and (self.partition is None or self.partition < 0):
            raise UsageError("--plan needs --partition K (K >= 0)")
        if self.manifest_uri is not None and self.partition not in (None, 0):
            raise UsageError("--partition goes with --plan; the --manifest form embeds the whole manifest")
        if self.manifest_uri is not None and not self.output_uri:
            raise UsageError("--manifest needs --output")

    @classmethod
    def of(cls, **values) -> EmbedConfig:
        """From flat keywords: this class's own fields, and any setting of its groups by name
        (``batch_size=16``, ``stages="text|image"``)."""
        own = {f.name for f in fields(cls)} - {"stage", "job"}
        groups = {"stage": StageSettings, "job": JobSettings}
        known = own | {f.name for kind in groups.values() for f in fields_of(kind)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown settings {unknown}")
        built = {name: from_flat(kind, values) for name, kind in groups.items()}
        return cls(**{k: v for k, v in values.items() if k in own}, **built)

    @property
    def stage_defaults(self) -> StageResources:
        """Each stage's resources unless the stage spec names its own."""
        return default_resources(self.stage)


@dataclass(frozen=True)
class PreparedJob:
    """The result of the pre-flight: what will run and where it lands."""

    config: EmbedConfig
    fragments: tuple[FragmentRef, ...]
    model_uri: str
    model_id: str
    embed_dim: int
    layout: StageLayout
    plan_id: str
    partition: int
    partition_uri: str
    #: content key of the partition's fragments ("" for a format 1 plan) and the output identity
    work_key: str = ""
    output_key: str = ""

    @property
    def rows_in(self) -> int:
        return sum(f.rows for f in self.fragments)

    @property
    def footprint(self) -> Footprint:
        return footprint_of(self.layout, self.config.job)
