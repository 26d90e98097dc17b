"""How a setting is declared once and derived everywhere.

A settings group is a frozen dataclass whose fields are made by :func:`setting`: the field's
name, type annotation and default, plus its bounds, help text and command-line flag. From
that one declaration come

* the trigger form's JSON schema (:func:`json_schema`),
* the command line (:func:`add_arguments` / :func:`from_args`),
* the Ray job's argv (:func:`to_argv`),
* validation on construction (:class:`Settings` checks every field in ``__post_init__``),
* a JSON-friendly flat dict and back (:func:`to_flat` / :func:`from_flat`, for XCom).

Types a field may have: ``int``, ``float``, ``str``, ``bool``, :class:`Pool`, each optionally
``| None``; a number may also take named values (``int | str`` with ``words=("auto",)``).
Standard library only: the control plane imports this at DAG parse time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from typing import Any, ClassVar, NamedTuple

from ray_jobs.errors import UsageError

_POOL_TEXT = re.compile(r"^[1-9][0-9]{0,3}(-[1-9][0-9]{0,3})?$")


class ConfigError(UsageError):
    """A setting's value is invalid; the message names the setting."""


class Pool(NamedTuple):
    """An actor pool's bounds, written ``MIN-MAX`` (or ``N``)."""

    min: int
    max: int

    @classmethod
    def parse(cls, value: Any) -> Pool:
        if isinstance(value, Pool):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            lo, hi = value
        else:
            lo, _, hi = str(value).partition("-")
            hi = hi or lo
        try:
            pool = cls(int(lo), int(hi))
        except (TypeError, ValueError):
            raise ValueError(f"expected MIN-MAX (for example 1-4), got {value!r}") from None
        if not 1 <= pool.min <= pool.max:
            raise ValueError(f"needs 1 <= min <= max, got {pool}")
        return pool

    def __str__(self) -> str:
        return f"{self.min}-{self.max}"


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything about a setting that its type annotation and default do not say."""

    help: str
    flag: str | None = None  # the command-line flag; None: not on the command line
    form: bool = True  # offered in the trigger form (and passed to the job when it has a flag)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    choices: tuple | None = None
    overrides: str | None = None  # a setting this one replaces when set (never both on a command line)
    #: part of the output identity: changing it changes the embeddings or which rows are rejected,
    #: so committed work made with another value is not reused (see :func:`identity_of`)
    identity: bool = False
    #: words a number setting also takes in place of a number (``auto``); its bounds bind numbers only
    words: tuple[str, ...] | None = None


def identity_of(*groups: Settings) -> dict[str, Any]:
    """The output-identity settings of *groups* (``identity=True`` in their declaration), by name."""
    return {
        f.name: _plain(getattr(group, f.name)) for group in groups for f in fields_of(type(group)) if f.spec.identity
    }


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Pool) else value


def setting(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A settings field: its *default* (none: required) and its :class:`Spec`."""
    return dataclasses.field(default=default, metadata={"spec": Spec(**spec)})


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: type
    nullable: bool
    spec: Spec
    default: Any

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


class Settings:
    """Base of a settings group: every field is checked on construction (values are coerced
    where that loses nothing: an int for a float, ``"1-2"`` or ``(1, 2)`` for a :class:`Pool`)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields_of(type(self)):
            value = coerce(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            problem = check_value(f, value)
            if problem:
                raise ConfigError(f"{f.name}: {problem}")


@functools.cache
def fields_of(cls: type) -> tuple[Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "spec" not in f.metadata:
            continue
        kind, nullable = _unwrap(hints[f.name])
        out.append(Field(f.name, kind, nullable, f.metadata["spec"], f.default))
    return tuple(out)


def _unwrap(hint: Any) -> tuple[type, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def coerce(f: Field, value: Any) -> Any:
    if value is None:
        return None
    if f.spec.words and isinstance(value, str):
        text = value.strip()
        if text in f.spec.words:
            return text
        if f.kind is int and re.fullmatch(r"[0-9]{1,9}", text):
            return int(text)  # a number as text (an environment variable, a form's text box)
        return value
    if f.kind is Pool:
        try:
            return Pool.parse(value)
        except ValueError:
            return value  # check_value names the problem
    if f.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_value(f: Field, value: Any, bounds: dict[str, Any] | None = None) -> str | None:
    """What is wrong with *value* for *f* (None: nothing). *bounds* tighten the declaration
    (JSON-schema keys: ``enum``, ``minimum``, ``maximum``), as a deployment does."""
    bounds = bounds or {}
    if value is None:
        return None if f.nullable or "null" in str(bounds.get("type")) else "must be set"
    if f.kind is Pool:
        try:
            Pool.parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    if f.spec.words and isinstance(value, str):
        if value in f.spec.words:
            return None
        return f"expected {' or '.join(f.spec.words)} or a {'whole ' if f.kind is int else ''}number, got {value!r}"
    if f.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"expected a number, got {value!r}"
    if f.kind is int and not isinstance(value, int):
        return f"expected a whole number, got {value!r}"
    if f.kind in (str, bool) and not isinstance(value, f.kind):
        return f"expected a {f.kind.__name__}, got {value!r}"
    s = f.spec
    choices = bounds.get("enum", s.choices)
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(str(c) for c in choices if c is not None)}, got {value!r}"
    lo, hi = bounds.get("minimum", s.minimum), bounds.get("maximum", s.maximum)
    if lo is not None and value < lo:
        return f"must be >= {lo}, got {value}"
    if hi is not None and value > hi:
        return f"must be <= {hi}, got {value}"
    if s.exclusive_minimum is not None and not value > s.exclusive_minimum:
        return f"must be > {s.exclusive_minimum}, got {value}"
    if isinstance(value, str):
        if s.min_length is not None and len(value) < s.min_length:
            return "must not be empty" if s.min_length == 1 else f"needs at least {s.min_length} characters"
        if s.max_length is not None and len(value) > s.max_length:
            return f"must be at most {s.max_length} characters"
        if s.pattern is not None and not re.search(s.pattern, value):
            return f"{value!r} does not match {s.pattern}"
    return None


# ------------------------------------------------------------------------------------ the form
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", Pool: "string"}


def field_schema(f: Field, section: str) -> dict[str, Any]:
    s = f.spec
    kind = _JSON_TYPES[f.kind]
    schema: dict[str, Any] = {"type": ["null", kind] if f.nullable else kind}
    if s.choices is not None:
        schema["enum"] = [None, *s.choices] if f.nullable else list(s.choices)
    if f.kind is Pool:
        schema["pattern"] = _POOL_TEXT.pattern
    if s.words:  # a number, or text: one of the words or a number written as text
        schema["type"] = [*schema["type"], "string"] if f.nullable else [kind, "string"]
        schema["pattern"] = "^(" + "|".join(re.escape(w) for w in s.words) + r"|[0-9]+)$"
    for key, value in (
        ("minimum", s.minimum),
        ("maximum", s.maximum),
        ("exclusiveMinimum", s.exclusive_minimum),
        ("minLength", s.min_length),
        ("maxLength", s.max_length),
        ("pattern", s.pattern),
    ):
        if value is not None:
            schema[key] = int(value) if f.kind is int and isinstance(value, float) else value
    schema["section"] = section
    schema["description"] = s.help
    return schema


def json_schema(cls: type[Settings]) -> dict[str, dict[str, Any]]:
    """The form fields of *cls*, in declaration order: name -> JSON schema (+ section, description)."""
    return {f.name: field_schema(f, cls.SECTION) for f in fields_of(cls) if f.spec.form}


def form_default(f: Field) -> Any:
    """The field's default as the form shows it (JSON: a pool as ``MIN-MAX``)."""
    if f.required:
        return ""
    return str(f.default) if isinstance(f.default, Pool) else f.default


# ------------------------------------------------------------------------------- flat dicts
def to_flat(obj: Settings) -> dict[str, Any]:
    """Field name -> JSON value (a pool as ``MIN-MAX``)."""
    return {f.name: _json(getattr(obj, f.name)) for f in fields_of(type(obj))}


def _json(value: Any) -> Any:
    return str(value) if isinstance(value, Pool) else value


def from_flat(cls: type[Settings], values: dict[str, Any]) -> Settings:
    """*cls* from the keys of *values* it declares (others are ignored; absent ones default)."""
    return cls(**{f.name: values[f.name] for f in fields_of(cls) if f.name in values})


# --------------------------------------------------------------------------- the job's argv
def to_argv(obj: Settings) -> list[str]:
    """``--flag=value`` for every form setting with a flag that is set: each value is one argv
    element, so none is read as a flag of its own or split by a shell. A setting another one
    overrides is left out when that one is set."""
    chosen = {f.spec.overrides for f in fields_of(type(obj)) if f.spec.overrides and getattr(obj, f.name)}
    return [
        f"{f.spec.flag}={_json(getattr(obj, f.name))}"
        for f in fields_of(type(obj))
        if f.spec.form and f.spec.flag and getattr(obj, f.name) is not None and f.name not in chosen
    ]


# -------------------------------------------------------------------------- the command line
def _arg_type(f: Field):
    def parse(text: str):
        if f.spec.words and text in f.spec.words:
            return text
        if f.kind is Pool:
            try:
                return Pool.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            value = f.kind(text)
        except ValueError:
            what = "a whole number" if f.kind is int else "a number"
            what = " or ".join((*(f.spec.words or ()), what))
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = check_value(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = f.kind.__name__
    return parse


def _help(f: Field) -> str:
    if f.required or f.default is None:
        return f.spec.help
    return f"{f.spec.help} (default {_json(f.default)})"


def add_arguments(parser: Any, cls: type[Settings], **defaults: Any) -> None:
    """One option per setting of *cls* that has a flag. Their parsed default is None, so
    :func:`from_args` knows what was given; *defaults* replace a declared default for this
    command (its help says so)."""
    for f in fields_of(cls):
        if not f.spec.flag:
            continue
        shown = dataclasses.replace(f, default=defaults[f.name]) if f.name in defaults else f
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(shown)}
        if f.kind is bool:
            kwargs["action"] = "store_true"
        elif f.spec.choices is not None:
            kwargs["choices"] = f.spec.choices
        else:
            kwargs["type"] = _arg_type(f)
            kwargs["metavar"] = "MIN-MAX" if f.kind is Pool else f.name.upper()
        parser.add_argument(f.spec.flag, **kwargs)


def from_args(cls: type[Settings], ns: argparse.Namespace, **defaults: Any) -> Settings:
    """*cls* from parsed arguments: given options, else this command's *defaults*, else the
    declared defaults. Two options one of which overrides the other are refused together."""
    given = {f.name: getattr(ns, f.name) for f in fields_of(cls) if f.spec.flag and getattr(ns, f.name) is not None}
    for f in fields_of(cls):
        if f.spec.overrides and f.name in given and f.spec.overrides in given:
            other = next(g for g in fields_of(cls) if g.name == f.spec.overrides)
            raise UsageError(f"give {other.spec.flag} or {f.spec.flag}, not both")
    return cls(**{**{k: v for k, v in defaults.items() if k not in given}, **given})
