"""Output identity: what defines the table and the commits, and what check_inputs says of a change."""

from ray_jobs.config.settings import JobSettings, StageSettings
from ray_jobs.output.identity import OutputIdentity, change_note, last_output, record_output


def test_only_identity_settings_change_the_key():
    base = OutputIdentity.of("m-1", StageSettings(), JobSettings())
    assert base.settings == {"dtype": "float32", "max_image_pixels": None, "max_object_bytes": None}
    execution = OutputIdentity.of("m-1", StageSettings(num_stages=3, stage_pool=(1, 4)), JobSettings(batch_size=8))
    assert execution.key == base.key, "batch size, pools and layout never invalidate committed work"
    assert OutputIdentity.of("m-1", StageSettings(dtype="bfloat16"), JobSettings()).key != base.key
    assert OutputIdentity.of("m-1", StageSettings(), JobSettings(max_object_bytes=1000)).key != base.key
    assert OutputIdentity.of("m-2", StageSettings(), JobSettings()).key != base.key


def test_the_change_note_names_what_changed(tmp_path):
    out = str(tmp_path)
    now = OutputIdentity.of("m-1", StageSettings(), JobSettings())
    assert "first registered night" in change_note(now, last_output(out, "shop"))
    record_output(out, "shop", now, "embeddings.shop__m_1__k", "night-1")
    assert "as last night (run night-1)" in change_note(now, last_output(out, "shop"))
    other = OutputIdentity.of("m-1", StageSettings(dtype="bfloat16"), JobSettings())
    note = change_note(other, last_output(out, "shop"))
    assert "dtype float32 -> bfloat16" in note and "starts a new table and embeds every row" in note
