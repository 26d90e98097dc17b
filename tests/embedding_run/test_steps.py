"""Form values are data: none reaches a shell, and infrastructure comes from the deployment.

The entrypoint tests run the job's command exactly as Ray's job supervisor does
(``subprocess.Popen(entrypoint, shell=True)``, ray/dashboard/modules/job/job_supervisor.py),
with a stand-in for the Python interpreter that records its argv instead of embedding, and
then parse that argv with the embed command's own parser.
"""

import copy
import json
import os
import stat
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowFailException

from embedding_run.config import RunConfig, build_params, param_schemas
from embedding_run.deployment import load_defaults
from embedding_run.jobs import embed_argv, embed_command
from embedding_run.steps import backend_config, run_config
from ray_jobs.config.declare import ConfigError

URIS = {"manifest_uri": "s3://b/m/", "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}


def _defaults(**over):
    cfg = load_defaults({})
    params = {name: p.resolve(suppress_exception=True) for name, p in build_params(cfg).items()}
    return cfg["deployment"], {**params, **URIS, **over}


def _hostile(marker):
    return [
        f"; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"a\ntouch {marker}\n",
        f"x' ; touch {marker} ; echo '",
        f'x" ; touch {marker} ; echo "',
        f"--force --summary-json {marker}",
        f"| touch {marker} &",
        "-",
        "--force",
    ]


def _string_params(deployment):
    return sorted(
        name for name, s in param_schemas(deployment).items() if "string" in str(s.get("type")) and "enum" not in s
    )


@pytest.fixture
def recorder(tmp_path):
    """A stand-in interpreter: writes its argv (JSON) to a file and does nothing else."""
    out = tmp_path / "argv.json"
    script = tmp_path / "python with space"
    script.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), out


def test_every_string_param_is_one_argv_element_or_refused(tmp_path, recorder):
    from ray_jobs.cli import build_parser

    python, out = recorder
    marker = tmp_path / "pwned"
    deployment, base = _defaults()
    # the working directory as a local root: hostile URI values (relative paths) reach the shell too
    deployment["allowed_uri_prefixes"] = [*deployment["allowed_uri_prefixes"], os.getcwd()]
    strings = _string_params(deployment)
    assert {"manifest_uri", "output_uri", "model_uri", "stages", "stage_pool", "preprocess_pool"} <= set(strings)
    reached = refused = 0
    for name in strings:
        for value in _hostile(marker):
            params = {**base, name: value}
            try:
                config = RunConfig.from_params(params, deployment)
            except ConfigError as exc:
                assert f"param {name}:" in str(exc)
                refused += 1
                continue
            plan_uri = f"{config.sources.output_uri.rstrip('/')}/runs/manual__1/plan.json"
            command = embed_command(config, plan_uri, 3, python)
            out.unlink(missing_ok=True)
            subprocess.run(command, shell=True, check=True, timeout=30)
            argv = json.loads(out.read_text())
            assert argv == embed_argv(config, plan_uri, 3, python)[1:], (name, value)
            args = build_parser().parse_args(argv[2:])
            assert (args.plan, args.partition, args.model) == (plan_uri, 3, config.sources.model_uri)
            assert args.force is False and args.summary_json is None
            reached += 1
    assert not marker.exists(), "a param value ran a command"
    assert reached and refused, (reached, refused)


def test_numbers_reach_the_job_as_typed_flags(recorder):
    from ray_jobs.cli import build_parser

    python, out = recorder
    deployment, params = _defaults(
        rows_per_file=5, max_image_pixels=1000, fetch_threads=2, stages="text|image", preprocess_pool="1-3"
    )
    config = RunConfig.from_params(params, deployment)
    subprocess.run(embed_command(config, "/o/plan.json", 0, python), shell=True, check=True, timeout=30)
    args = build_parser().parse_args(json.loads(out.read_text())[2:])
    assert (args.rows_per_file, args.max_image_pixels, args.fetch_threads) == (5, 1000, 2)
    assert args.stages == "text|image" and args.preprocess_pool == (1, 3) and args.max_object_bytes is None
    assert args.num_stages is None


def test_the_stage_spec_check_inputs_resolved_reaches_every_job_instead_of_num_stages(recorder):
    """The job then balances nothing itself (that builds towers: torch and transformers in the driver)."""
    from ray_jobs.cli import build_parser

    python, out = recorder
    deployment, params = _defaults(num_stages=2)
    config = RunConfig.from_params(params, deployment)
    resolved = "text:0-3@cpus=1,gpus=0,pool=1-1|image:0-5@cpus=1,gpus=0,pool=1-1"
    subprocess.run(
        embed_command(config, "/o/plan.json", 0, python, stages=resolved), shell=True, check=True, timeout=30
    )
    args = build_parser().parse_args(json.loads(out.read_text())[2:])
    assert args.stages == resolved and args.num_stages is None
    subprocess.run(embed_command(config, "/o/plan.json", 0, python), shell=True, check=True, timeout=30)
    args = build_parser().parse_args(json.loads(out.read_text())[2:])
    assert args.stages is None and args.num_stages == 2, "without a resolved spec: the param as given"


def test_a_conf_with_the_removed_params_is_refused_naming_them():
    deployment, params = _defaults(backend="kuberay")
    params["kuberay"] = {"image": "evil.example/x", "kube_config": "/tmp/evil", "service_account": "admin"}
    params["embed_extra_args"] = "; touch /tmp/x"
    with pytest.raises(AirflowFailException, match=r"unknown params 'embed_extra_args', 'kuberay' \(did you mean"):
        run_config(params, deployment)
    del params["kuberay"], params["embed_extra_args"]
    config = run_config(params, deployment)
    cfg = backend_config(config, deployment)
    assert cfg["image"] == deployment["kuberay"]["images"][0]
    assert cfg["service_account"] == deployment["kuberay"]["service_account"]
    assert "kube_config" not in cfg and "images" not in cfg


def test_kuberay_settings_are_the_deployments_narrowed_by_the_form():
    deployment, params = _defaults(backend="kuberay", kuberay_gpu_workers_max=2, kuberay_cpu_workers_max=1)
    cfg = backend_config(run_config(params, deployment), deployment)
    k8s = deployment["kuberay"]
    assert cfg["namespace"] == k8s["namespace"] and cfg["kubernetes_conn_id"] == k8s["kubernetes_conn_id"]
    assert cfg["gpu_workers"]["max_replicas"] == 2 and cfg["gpu_workers"]["gpus"] == k8s["gpu_workers"]["gpus"]
    assert cfg["cpu_workers"] == {**k8s["cpu_workers"], "max_replicas": 1, "min_replicas": 1}
    from airflow_ray.backends.kuberay import KubeRayBackend

    KubeRayBackend.from_config(cfg).render("emb-x-0123456789")  # a valid backend config


def test_a_run_the_deployment_no_longer_allows_is_refused_before_any_cluster():
    deployment, params = _defaults(backend="existing")
    narrowed = copy.deepcopy(deployment)
    narrowed["backends"] = ["local"]
    with pytest.raises(AirflowFailException, match="param backend:"):
        backend_config(run_config(params, narrowed), narrowed)
    deployment, params = _defaults(backend="local", local_num_cpus=64)
    with pytest.raises(AirflowFailException, match="param local_num_cpus:"):
        backend_config(run_config(params, deployment), deployment)


def test_local_and_existing_configs():
    deployment, params = _defaults(local_num_cpus=3)
    assert backend_config(run_config(params, deployment), deployment) == {"num_cpus": 3}
    deployment, params = _defaults(backend="existing")
    assert backend_config(run_config(params, deployment), deployment) == {"conn_id": "ray_default"}


def test_every_setting_the_job_gets_is_a_typed_param_and_a_flag_of_the_embed_parser():
    """Nothing free-form is appended: each flag maps one schema'd param to one parser option."""
    from ray_jobs.cli import build_parser
    from ray_jobs.config.declare import fields_of
    from ray_jobs.config.settings import JobSettings, StageSettings

    deployment, _ = _defaults()
    schemas = param_schemas(deployment)
    embed = build_parser()._subparsers._group_actions[0].choices["embed"]
    options = {opt for action in embed._actions for opt in action.option_strings}
    for f in (f for kind in (StageSettings, JobSettings) for f in fields_of(kind) if f.spec.form):
        assert f.name in schemas and f.spec.flag in options, f.name
        closed = "pattern" in schemas[f.name] or "enum" in schemas[f.name]  # a string param must be constrained
        assert "string" not in str(schemas[f.name]["type"]) or closed


def test_existing_backend_refuses_a_connection_that_is_not_a_ray_dashboard(monkeypatch):
    """Its password would go to its host as a bearer token: refused before any request."""
    from airflow_ray.backends.existing import ExistingClusterBackend
    from airflow_ray.errors import ClusterError

    monkeypatch.setenv(
        "AIRFLOW_CONN_NOT_RAY",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 9, "password": "db-password"}),
    )
    with pytest.raises(ClusterError, match="of type 'postgres', not 'ray_dashboard'"):
        ExistingClusterBackend(conn_id="not_ray").up("emb-x")
