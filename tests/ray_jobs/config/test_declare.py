"""The declaration machinery: one field gives its schema, its option, its argv and its check."""

import argparse
import dataclasses

import pytest

from ray_jobs.config.declare import (
    ConfigError,
    Pool,
    Settings,
    add_arguments,
    from_args,
    from_flat,
    json_schema,
    setting,
    to_argv,
    to_flat,
)
from ray_jobs.errors import UsageError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Demo(Settings):
    SECTION = "Demo"

    count: int = setting(2, help="How many", flag="--count", minimum=1, maximum=10)
    ratio: float = setting(0.5, help="A share", flag="--ratio", exclusive_minimum=0)
    pool: Pool = setting(Pool(1, 2), help="A pool", flag="--pool")
    mode: str = setting("a", help="A mode", flag="--mode", choices=("a", "b"))
    spec: str | None = setting(None, help="Replaces count", flag="--spec", pattern=r"^[a-z|]+$", overrides="count")
    hidden: int = setting(7, help="Command line only", flag="--hidden", minimum=0, form=False)
    name: str = setting(help="Required, no flag", min_length=1)


def test_pools_parse_from_text_and_tuples_and_print_as_min_max():
    assert Pool.parse("3") == Pool(3, 3) and Pool.parse((1, 4)) == Pool(1, 4) and str(Pool(1, 4)) == "1-4"
    for bad, message in (("x", "expected MIN-MAX"), ("3-1", "needs 1 <= min <= max"), ("0-2", "needs 1 <=")):
        with pytest.raises(ValueError, match=message):
            Pool.parse(bad)


def test_construction_coerces_what_loses_nothing_and_checks_every_field():
    d = Demo(name="x", ratio=1, pool="2-3")
    assert d.ratio == 1.0 and isinstance(d.ratio, float) and d.pool == Pool(2, 3)
    for kwargs, message in (
        ({"count": 0}, "count: must be >= 1, got 0"),
        ({"count": 11}, "count: must be <= 10"),
        ({"count": True}, "count: expected a number"),
        ({"count": 1.5}, "count: expected a whole number"),
        ({"ratio": 0}, "ratio: must be > 0"),
        ({"mode": "c"}, "mode: must be one of a, b"),
        ({"spec": "a; rm"}, "spec: 'a; rm' does not match"),
        ({"pool": "4-1"}, "pool: needs 1 <= min <= max"),
        ({"name": ""}, "name: must not be empty"),
        ({"name": None}, "name: must be set"),
    ):
        with pytest.raises(ConfigError, match=message):
            Demo(**{"name": "x", **kwargs})
    assert issubclass(ConfigError, UsageError), "a bad setting is an input error: exit 2, one line"


def test_the_form_schema_has_types_bounds_sections_and_only_form_fields():
    schema = json_schema(Demo)
    assert "hidden" not in schema
    assert schema["count"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 10,
        "section": "Demo",
        "description": "How many",
    }
    assert schema["spec"]["type"] == ["null", "string"] and schema["mode"]["enum"] == ["a", "b"]
    assert schema["pool"]["type"] == "string" and "pattern" in schema["pool"]
    assert schema["name"]["minLength"] == 1


def test_argv_has_each_set_form_setting_once_and_drops_what_is_overridden():
    assert to_argv(Demo(name="x")) == ["--count=2", "--ratio=0.5", "--pool=1-2", "--mode=a"]
    assert to_argv(Demo(name="x", spec="a|b")) == ["--ratio=0.5", "--pool=1-2", "--mode=a", "--spec=a|b"]


def test_the_command_line_round_trips_and_refuses_an_option_with_its_override():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    given = from_args(Demo, parser.parse_args([*to_argv(Demo(name="x", count=4)), "--hidden=3"]), name="x")
    assert given == Demo(name="x", count=4, hidden=3)
    assert from_args(Demo, parser.parse_args([]), name="x") == Demo(name="x"), "absent options: declared defaults"
    with pytest.raises(UsageError, match="give --count or --spec, not both"):
        from_args(Demo, parser.parse_args(["--count=3", "--spec=a"]), name="x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--count=0"])


def test_flat_dicts_round_trip_as_json_values():
    d = Demo(name="x", pool="2-5", spec="a")
    flat = to_flat(d)
    assert flat["pool"] == "2-5" and from_flat(Demo, {**flat, "unrelated": 1}) == d
