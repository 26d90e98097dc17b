"""One declaration per setting: the form's schema, the job's argv, the command line and the
job's config are all derived from it, and they agree for every setting."""

import dataclasses

import jsonschema
import pytest

from embedding_run.config import RunConfig, form_fields, param_schemas
from embedding_run.deployment import load_defaults
from embedding_run.jobs import embed_argv
from ray_jobs.cli import build_parser
from ray_jobs.cli.embed import embed_config
from ray_jobs.config.declare import ConfigError, Pool, fields_of, form_default
from ray_jobs.config.settings import JobSettings, StageSettings

URIS = {"manifest_uri": "s3://b/m/", "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}


def _other_value(f, schema):
    """A valid value for *f* unlike its default, within the form's schema."""
    if "enum" in schema:
        options = [v for v in schema["enum"] if v != f.default and v is not None]
        return options[0] if options else f.default
    if f.kind is Pool:
        return "2-3"
    if f.kind is str:
        return {"stages": "text|image", "dataset": "nightly.v2", "max_stage_memory": "8GiB"}.get(f.name, f.default)
    if f.spec.words and f.default in f.spec.words:
        return 3  # a number in place of the word
    lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
    hi = schema.get("maximum", 10**9)
    base = f.default if f.default is not None else lo
    value = base + 1 if f.kind is int else base + 0.5
    return min(max(value, lo + (1 if f.kind is int and "exclusiveMinimum" in schema else 0)), hi)


@pytest.fixture(scope="module")
def deployment():
    return load_defaults({})["deployment"]


def _changed_config(deployment, **over):
    schemas = param_schemas(deployment)
    params = {f.name: _other_value(f, schemas[f.name]) for f in form_fields() if not f.required}
    return RunConfig.from_params({**params, **URIS, **over}, deployment)


def _bare(schema):
    return {k: v for k, v in schema.items() if k not in ("section", "description")}


@pytest.mark.parametrize("stages", [None, "text|image"])
def test_form_argv_cli_and_job_config_agree_for_every_setting(deployment, stages):
    config = _changed_config(deployment, stages=stages)
    schemas = param_schemas(deployment)
    # the form: exactly the declared form settings, each value valid under its own schema
    assert list(schemas) == [f.name for f in form_fields()]
    flat = config.to_dict()
    for name, schema in schemas.items():
        jsonschema.validate(flat[name], _bare(schema))
    to_job = [f for kind in (StageSettings, JobSettings) for f in fields_of(kind) if f.spec.form]
    unchanged = [f.name for f in to_job if flat[f.name] == form_default(f) and f.name != "stages"]
    assert unchanged == [], "every setting that reaches the job differs from its default here"
    # the argv, parsed by the embed command's own parser, gives the job the run's settings back
    argv = embed_argv(config, "/o/plan.json", 4, "python")
    job = embed_config(build_parser().parse_args(argv[3:]))
    assert job.job == config.job
    expected_stage = (
        dataclasses.replace(config.stage, num_stages=StageSettings().num_stages) if stages else config.stage
    )
    assert job.stage == expected_stage, "with a stage spec the job gets the spec, not num_stages"
    assert (job.plan_uri, job.partition, job.model_uri) == ("/o/plan.json", 4, URIS["model_uri"])


def test_every_flagged_setting_is_an_option_with_its_declared_default():
    embed = build_parser()._subparsers._group_actions[0].choices["embed"]
    options = {opt: action for action in embed._actions for opt in action.option_strings}
    defaults = embed_config(build_parser().parse_args(["embed", "--plan=p", "--partition=0", "--model=m"]))
    for kind, built in ((StageSettings, defaults.stage), (JobSettings, defaults.job)):
        assert built == kind(), "the command's defaults are the declared ones"
        for f in fields_of(kind):
            assert f.spec.flag in options, f.name
            assert f.spec.help in options[f.spec.flag].help


def test_a_new_setting_is_one_declaration(deployment):
    """What adding a setting takes: one field in a group; the form, the argv, the parser and
    the job's config follow (shown here with a subclass standing in for the edited group)."""
    from ray_jobs.config.declare import add_arguments, from_args, json_schema, setting, to_argv

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(JobSettings):
        prefetch_batches: int = setting(2, help="Batches prefetched per actor", flag="--prefetch-batches", minimum=0)

    assert json_schema(Extended)["prefetch_batches"]["minimum"] == 0
    assert "--prefetch-batches=5" in to_argv(Extended(prefetch_batches=5))
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, Extended)
    assert from_args(Extended, parser.parse_args(["--prefetch-batches=5"])).prefetch_batches == 5
    with pytest.raises(ConfigError, match="prefetch_batches: must be >= 0"):
        Extended(prefetch_batches=-1)


def test_params_are_checked_against_the_deployment_naming_the_param(deployment):
    with pytest.raises(ConfigError, match="param backend: must be one of"):
        RunConfig.from_params({**URIS, "backend": "docker"}, deployment)
    with pytest.raises(ConfigError, match="param batch_size: must be >= 1"):
        RunConfig.from_params({**URIS, "batch_size": 0}, deployment)
    with pytest.raises(ConfigError, match="param manifest_uri: must not be empty"):
        RunConfig.from_params({**URIS, "manifest_uri": ""}, deployment)


def test_the_config_round_trips_through_xcom(deployment):
    config = _changed_config(deployment)
    import json

    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
