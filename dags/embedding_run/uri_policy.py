"""Where a run may read and write: the deployment's ``allowed_uri_prefixes``.

The three URI params (``manifest_uri``, ``output_uri``, ``model_uri``) are data from whoever
triggers the run, and each one is opened by the Airflow workers and the Ray workers with their
own credentials. Each must therefore start with a prefix the deployment lists:

* ``scheme://``: any URI of that protocol (the default list is ``s3://`` and ``gs://``);
* ``scheme://bucket/prefix/``: only URIs under that prefix (a whole path segment: ``s3://b/x``
  does not admit ``s3://b/xy``);
* an absolute local path (or ``file:///path``): that directory and everything under it, after
  ``..`` and symbolic links are resolved on this machine.

``http(s)`` and any other protocol pass only when listed. A host that is a loopback,
link-local (``169.254.169.254``), private or otherwise special address, ``localhost``, the
cloud metadata names, or a number that some clients read as an address, passes only under a
prefix that names that host itself. A chained fsspec URL (``a::b``) never passes.

Standard library only: the form's pattern (:func:`form_pattern`) is built at DAG parse time.
"""

from __future__ import annotations

import ipaddress
import os
import re

from ray_jobs.config.declare import ConfigError

#: the three params that name storage
URI_PARAMS = ("manifest_uri", "output_uri", "model_uri")
#: what a deployment allows when it lists nothing
DEFAULT_PREFIXES = ("s3://", "gs://")
_METADATA_HOSTS = frozenset({"localhost", "metadata", "metadata.google.internal", "instance-data"})
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9.]+)$", re.IGNORECASE)
_REGEX_SPECIAL = re.compile(r"([.^$*+?()\[\]{}|\\])")


def scheme_of(uri: str) -> str | None:
    """The URI's protocol, lower case, or None for a local path; the rule of ``ray_jobs.storage``."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def _local_path(uri: str) -> str | None:
    scheme = scheme_of(uri)
    if scheme == "file":
        return os.path.realpath(uri[len("file://") :])
    if scheme is None:
        return os.path.realpath(uri)
    return None


def normalize_prefixes(entries) -> list[str]:
    """The deployment's list, checked: each entry a ``scheme://`` prefix or an absolute local
    directory (resolved, ending in ``/``). Raises :class:`ConfigError` naming the entry."""
    if entries is None or entries == []:
        return list(DEFAULT_PREFIXES)
    if not isinstance(entries, list):
        raise ConfigError(f"deployment.allowed_uri_prefixes must be a list, got {entries!r}")
    out = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip() or "::" in entry or _has_dot_dot(entry):
            raise ConfigError(f"deployment.allowed_uri_prefixes: {entry!r} is not a URI prefix or a local directory")
        entry = entry.strip()
        scheme = scheme_of(entry)
        if scheme not in (None, "file"):
            rest = entry[len(scheme) + 3 :]
            out.append(f"{scheme}://{rest}")
            continue
        path = entry[len("file://") :] if scheme == "file" else entry
        if not os.path.isabs(path):
            raise ConfigError(f"deployment.allowed_uri_prefixes: a local root must be an absolute path, got {entry!r}")
        out.append(os.path.realpath(path).rstrip("/") + "/")
    return list(dict.fromkeys(out))


def _has_dot_dot(text: str) -> bool:
    return ".." in re.split(r"[/\\]", text)


def _under(value: str, prefix: str) -> bool:
    """*value* is *prefix* or below it, on a path-segment boundary."""
    if prefix.endswith(("/", "://")):
        return value.startswith(prefix) or value == prefix.rstrip("/")
    return value == prefix or value.startswith(prefix + "/")


def _host(rest: str) -> str:
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host = authority.rsplit("@", 1)[-1]
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def _special_host(host: str) -> bool:
    """A host that reaches this machine, its metadata service or a private network."""
    if host in _METADATA_HOSTS or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return bool(_NUMERIC_HOST.match(host))  # 2852039166, 0xa9fea9fe, 0251.0376.0251.0376, 127.1
    return not address.is_global


def uri_problem(uri: str, allowed: list[str]) -> str | None:
    """What the deployment's list has against *uri* (None: it is allowed)."""
    listed = ", ".join(allowed)
    if "::" in uri:
        return f"{uri!r}: chained URLs (a::b) are not allowed"
    local = _local_path(uri)
    if local is not None:
        if any(_under(local + "/", p) for p in allowed if p.startswith("/")):
            return None
        return f"{uri!r} (on this machine: {local}) is not under a local root the deployment lists ({listed})"
    scheme = scheme_of(uri)
    rest = uri[len(scheme) + 3 :]
    if _has_dot_dot(rest):
        return f"{uri!r}: '..' is not allowed in a URI"
    value = f"{scheme}://{rest}"
    matches = [p for p in allowed if not p.startswith("/") and _under(value, p)]
    if not matches:
        return f"{uri!r} is not under a prefix the deployment lists ({listed})"
    host = _host(rest)
    if _special_host(host) and not any(_host(p[len(scheme) + 3 :]) == host for p in matches):
        return f"{uri!r}: the host {host} is a local, link-local or private address; the deployment must list it"
    return None


def check_uri_params(values: dict, allowed: list[str]) -> None:
    """Raise :class:`ConfigError` naming the first URI param the deployment does not allow."""
    for name in URI_PARAMS:
        value = values.get(name)
        if value:
            problem = uri_problem(value, allowed)
            if problem:
                raise ConfigError(f"param {name}: {problem} (deployment.allowed_uri_prefixes)")


def _escape(text: str) -> str:
    """*text* as a literal in a regular expression that Python and a browser both read
    (``re.escape`` also escapes ``-``, which a browser's unicode-mode pattern refuses)."""
    return _REGEX_SPECIAL.sub(r"\\\1", text)


def form_pattern(allowed: list[str]) -> str:
    """A JSON-schema pattern (the same in Python and in the browser) that admits what
    :func:`uri_problem` may allow: a first check in the form; ``check_inputs`` decides."""
    options = []
    for prefix in allowed:
        if prefix.startswith("/"):
            root = _escape(prefix.rstrip("/"))
            options.append(f"(?:file://)?{root}(?:/|$)")
        elif prefix.endswith(("/", "://")):
            options.append(_escape(prefix))
        else:
            options.append(f"{_escape(prefix)}(?:/|$)")
    return "^(?:" + "|".join(options) + ")" if options else "^$"
