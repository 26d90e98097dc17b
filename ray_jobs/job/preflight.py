"""The job's pre-flight: everything that can be checked without Ray (the partition's
fragments and their files, the model, the stage layout, the output slot), so a bad input
fails in seconds with one clear line."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ray_jobs import storage
from ray_jobs.contract.ids import make_plan_id, work_key
from ray_jobs.contract.layout import partition_dir, work_dir
from ray_jobs.errors import ManifestError, PlanError, UsageError
from ray_jobs.job.config import EmbedConfig, PreparedJob
from ray_jobs.job.datasource import FragmentRef
from ray_jobs.output.identity import OutputIdentity
from ray_jobs.planning.manifest import fingerprint, read_manifest


def _whole_manifest(cfg: EmbedConfig) -> tuple[tuple[FragmentRef, ...], str, str, str, None]:
    files = read_manifest(cfg.manifest_uri)
    refs = tuple(FragmentRef(f.uri, tuple(range(len(f.row_group_rows))), f.rows) for f in files if f.rows)
    key = work_key((f.uri, f.version, range(len(f.row_group_rows))) for f in files if f.rows)
    return refs, make_plan_id(fingerprint(files), {"mode": "whole-manifest"}), cfg.output_uri, key, None


def _plan_partition(cfg: EmbedConfig):
    from ray_jobs.planning.plan import load_plan

    plan = load_plan(cfg.plan_uri)
    if cfg.output_uri and cfg.output_uri.rstrip("/") != plan.output_uri.rstrip("/"):
        raise UsageError(f"--output {cfg.output_uri} differs from the plan's output {plan.output_uri}; drop --output")
    try:
        part = plan.partition(cfg.partition)
    except IndexError as exc:
        raise PlanError(f"--partition: {exc}") from exc
    refs = tuple(FragmentRef(plan.files[f.file].uri, f.row_groups, f.rows) for f in part.fragments)

    def check(ref_file) -> None:
        found = storage.stat_file(ref_file.uri)
        if found is None:
            raise ManifestError(
                f"manifest file {ref_file.uri} no longer exists (planned at version {ref_file.version or '-'}); "
                "this partition cannot run: the next night's plan retires its rows"
            )
        size, version = found
        if size != ref_file.size or (ref_file.version and version != ref_file.version):
            raise ManifestError(
                f"manifest file {ref_file.uri} changed since planning (size {size}, planned {ref_file.size}; "
                f"version {version}, planned {ref_file.version}); this partition fails, and the next night plans "
                "the new version"
            )

    used = {f.file for f in part.fragments}
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(used)))) as pool:
        list(pool.map(check, [plan.files[i] for i in sorted(used)]))
    return refs, plan.plan_id, plan.output_uri, part.key, plan


def choose_layout(cfg: EmbedConfig, ckpt, refs, plan, model_id: str, out_key: str):
    """The job's stage layout (:func:`~ray_jobs.model.auto_layout.decide_layout`, on a sample of
    the partition's own rows for ``num_stages: auto``), rebalanced by the plan's committed
    partitions when the layout is automatic (:mod:`ray_jobs.perf.rebalance`)."""
    from ray_jobs.model.auto_layout import decide_layout

    s = cfg.stage
    shapes = None
    if s.auto and not s.auto_stages and refs:
        from ray_jobs.perf.data_sample import measure_shapes, sample_rows

        # captions only: the layout does not depend on image sizes, and every image is read once,
        # by the pipeline
        shapes = measure_shapes(ckpt, sample_rows([(r.uri, r.row_groups) for r in refs]), open_images=False)
    decision = decide_layout(ckpt, s, cfg.job.batch_size, shapes)
    print("\n".join(decision.lines()), flush=True)
    layout = decision.layout
    if s.auto and plan is not None and s.rebalance_min_gain is not None and len(layout.stages) > 1:
        from ray_jobs.model.auto_layout import data_layer_costs
        from ray_jobs.perf import rebalance
        from ray_jobs.perf.data_sample import DataShapes, sample_rows, token_counts

        measured = rebalance.committed_stats(plan, cfg.partition or 0, model_id, out_key)
        prior = None
        if measured:  # a stage's measured time is spread over its layers by their FLOPs at the data's lengths
            text = ckpt.text_processing
            if shapes is None and refs:
                sample = sample_rows([(r.uri, r.row_groups) for r in refs])
                counts = token_counts(text, sample.texts)
                shapes = DataShapes(counts, (), text.max_length, text.pad_to_max_length, sample.source)
            seq = shapes.text_seq(cfg.job.batch_size) if shapes is not None and shapes.text_tokens else None
            prior = data_layer_costs(ckpt, s.dtype, seq)
        choice = rebalance.choose_layout(layout, measured, s.rebalance_min_gain, prior, cfg.job.preprocess_pool.min)
        print(choice.line(), flush=True)
        layout = choice.layout
    return layout


def prepare(cfg: EmbedConfig) -> PreparedJob:
    """Check every input without Ray; raises :class:`~ray_jobs.errors.JobInputError` subclasses."""
    from ray_jobs.model.checkpoint import open_checkpoint

    refs, plan_id, output, key, plan = _plan_partition(cfg) if cfg.plan_uri else _whole_manifest(cfg)
    if not storage.is_remote(output):
        output = storage.filesystem_for(output)[1]  # absolute local path in markers and summaries
    partition = cfg.partition or 0
    ckpt = open_checkpoint(cfg.model_uri)
    model_id = cfg.model_id or ckpt.model_id
    out_key = OutputIdentity.of(model_id, cfg.stage, cfg.job).key
    layout = choose_layout(cfg, ckpt, refs, plan, model_id, out_key)
    if cfg.stage.dtype == "float16":
        cpu_only = [s.name for s in layout.stages if s.resources.num_gpus <= 0]
        if cpu_only:
            raise UsageError(
                f"--dtype float16 needs CUDA, but {', '.join(cpu_only)} has no GPU; "
                "use --dtype bfloat16 on CPU or give every stage gpus (--stage-num-gpus / gpus= in --stages)"
            )
    where = work_dir(output, model_id, out_key, key) if key else partition_dir(output, model_id, plan_id, partition)
    return PreparedJob(
        config=cfg,
        fragments=refs,
        model_uri=ckpt.uri,
        model_id=model_id,
        embed_dim=ckpt.embed_dim,
        layout=layout,
        plan_id=plan_id,
        partition=partition,
        partition_uri=where,
        work_key=key,
        output_key=out_key,
    )
