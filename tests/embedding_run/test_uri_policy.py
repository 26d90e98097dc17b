"""The URI params point only where the deployment allows: its schemes and prefixes, its local
roots, never a metadata or loopback address unless it names that host."""

from __future__ import annotations

import json
import os
import re

import pytest

from embedding_run.config import RunConfig, build_params, param_schemas
from embedding_run.deployment import load_defaults
from embedding_run.uri_policy import form_pattern, normalize_prefixes, scheme_of, uri_problem
from ray_jobs.config.declare import ConfigError

URIS = {"manifest_uri": "s3://b/m/", "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}


@pytest.fixture
def allowed(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "link")
    return normalize_prefixes(["s3://", "gs://bucket/emb/", str(tmp_path / "data"), "https://models.example.com/m/"])


def test_the_default_is_s3_and_gs_only():
    deployment = load_defaults({})["deployment"]
    assert deployment["allowed_uri_prefixes"] == ["s3://", "gs://"]
    for uri in ("/etc", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "https://x.example/m"):
        assert uri_problem(uri, deployment["allowed_uri_prefixes"]), uri


@pytest.mark.parametrize(
    "uri",
    [
        "s3://any-bucket/manifest/",
        "s3a://x",  # refused below: another protocol name
        "gs://bucket/emb/run1",
        "gs://bucket/emb",
        "https://models.example.com/m/clip",
        "{root}/data/manifest",
        "file://{root}/data/out",
        "{root}/data",
    ],
)
def test_allowed(uri, allowed, tmp_path):
    uri = uri.format(root=tmp_path)
    problem = uri_problem(uri, allowed)
    assert (problem is None) == (not uri.startswith("s3a://")), problem


@pytest.mark.parametrize(
    "uri, why",
    [
        ("http://169.254.169.254/latest/meta-data/", "not under a prefix"),
        ("gs://bucket/emb-other/x", "not under a prefix"),
        ("gs://other/emb/x", "not under a prefix"),
        ("https://models.example.com/mx", "not under a prefix"),
        ("https://models.example.com@169.254.169.254/m/x", "not under a prefix"),
        ("s3://169.254.169.254/x", "link-local"),
        ("s3://2852039166/x", "link-local"),
        ("s3://[0:0:0:0:0:0:0:1]/x", "link-local"),
        ("s3://localhost/x", "link-local"),
        ("s3://b/../x", "'..'"),
        ("simplecache::s3://b/x", "chained"),
        ("{root}/data/../elsewhere/x", "not under a local root"),
        ("{root}/data/link/x", "not under a local root"),  # a symbolic link out of the root
        ("{root}/data-other/x", "not under a local root"),
        ("file:///etc/passwd", "not under a local root"),
        ("relative/path", "not under a local root"),
    ],
)
def test_refused(uri, why, allowed, tmp_path):
    problem = uri_problem(uri.format(root=tmp_path), allowed)
    assert problem and why in problem, problem


def test_a_listed_special_host_is_allowed_and_only_that_host():
    allowed = normalize_prefixes(["http://127.0.0.1:9000/models/", "s3://"])
    assert uri_problem("http://127.0.0.1:9000/models/clip", allowed) is None
    assert "not under a prefix" in uri_problem("http://127.0.0.1:9001/models/clip", allowed)


def test_the_scheme_rule_is_the_storage_layers():
    from ray_jobs import storage

    for uri in ("s3://b/x", "S3://b/x", "file:///x", "/x", "a::s3://b", "1x://y", "gs://b", "memory://x", "x"):
        assert (scheme_of(uri) not in (None, "file")) == storage.is_remote(uri), uri


def test_the_form_pattern_never_admits_what_the_check_refuses_by_prefix(allowed, tmp_path):
    pattern = re.compile(form_pattern(allowed))
    for uri in ("http://169.254.169.254/x", "gs://other/x", f"{tmp_path}/data-other/x", "/etc/passwd", "az://c/x"):
        assert not pattern.search(uri), uri
    for uri in ("s3://b/x", "gs://bucket/emb/x", f"{tmp_path}/data/x", f"file://{tmp_path}/data/x"):
        assert pattern.search(uri), uri
    assert "\\-" not in form_pattern(normalize_prefixes(["s3://my-bucket/x-y/"])), "browsers refuse \\- in u-mode"


def test_every_uri_param_is_checked_naming_it(tmp_path):
    deployment = load_defaults({})["deployment"]
    for name in URIS:
        with pytest.raises(ConfigError, match=rf"param {name}: 'http://169\.254\.169\.254/x' is not under"):
            RunConfig.from_params({**URIS, name: "http://169.254.169.254/x"}, deployment)
    assert RunConfig.from_params(URIS, deployment).sources.model_uri == URIS["model_uri"]


def test_the_form_refuses_what_the_deployment_does_not_list(tmp_path):
    from airflow.sdk.exceptions import ParamValidationError

    env = {"EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": json.dumps(["s3://", str(tmp_path)])}
    cfg = load_defaults(env)
    schemas = param_schemas(cfg["deployment"])
    assert "s3://" in schemas["model_uri"]["description"] and str(tmp_path) in schemas["model_uri"]["description"]
    params = build_params(cfg)
    for bad in ("http://169.254.169.254/latest/meta-data/", "/etc/passwd", "gs://b/x"):
        with pytest.raises(ParamValidationError):
            params["model_uri"].resolve(bad)
    assert params["model_uri"].resolve(f"{tmp_path}/model") == f"{tmp_path}/model"


def test_a_default_uri_the_deployment_does_not_allow_fails_the_parse(tmp_path):
    with pytest.raises(ConfigError, match=r"default of model_uri \(EMB_MODEL_URI\).*allowed_uri_prefixes"):
        load_defaults({"EMB_MODEL_URI": "http://169.254.169.254/x"})
    with pytest.raises(ConfigError, match="local root must be an absolute path"):
        load_defaults({"EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": "s3://,relative/dir"})
    cfg = load_defaults({"EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": f"s3://,{tmp_path}", "EMB_OUTPUT_URI": str(tmp_path)})
    assert cfg["params"]["output_uri"] == str(tmp_path)
