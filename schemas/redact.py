"""Secret-free forms of URLs: what a manifest, a card, a cache or a log line may record of an endpoint.

A URL can carry credentials in two places: userinfo (`user:password@host`) and query parameters
(`?key=...`, `?sig=...`, `?access_token=...`). `redact_url` keeps scheme, host, port, path and the
harmless query parameters, drops userinfo and masks secret-looking query values; `url_secrets` lists
the raw secret values so that free text (error messages, responses, log lines) can be masked too.

Used by the config's JSON serialization (so every JSON dump of a config, which is what the manifest,
the card and Prefect's parameter records store, is redacted) and by the rewriter's logging filter.
Kept free of project imports so schemas and pipeline code can both use it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

MASK = "***"

# Query parameter names whose values are credentials. Matched as substrings of the lowercased name
# without '-' and '_', so `api-key`, `X-Amz-Signature`, `access_token` and `sig` all count; a few
# harmless names (`api-version`) never match. Over-masking a harmless value costs nothing.
_SECRET_NAME = re.compile(
    r"key|token|secret|sig|password|passwd|pwd|auth|credential|session|jwt|bearer|code|cookie"
)


def is_secret_param(name: str) -> bool:
    """Whether a query parameter of this name carries a credential (see `_SECRET_NAME`)."""
    return bool(_SECRET_NAME.search(name.lower().replace("-", "").replace("_", "")))


def has_userinfo(url: str) -> bool:
    """Whether the URL names a user or password before its host (`scheme://user:pw@host`)."""
    return "@" in urlsplit(url).netloc


def redact_url(url: str) -> str:
    """The URL without userinfo, with the value of every secret query parameter replaced by '***'."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # not a URL we can take apart: record nothing of it
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = query.split("&")
        out = []
        for pair in pairs:
            name, eq, _value = pair.partition("=")
            out.append(f"{name}={MASK}" if eq and is_secret_param(unquote(name)) else pair)
        query = "&".join(out)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The credential values in a URL (userinfo parts, secret query values), raw and percent-decoded."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        found += [user, password, unquote(user), unquote(password)]
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if is_secret_param(name):
            found += [value, quote(value, safe=""), quote(value)]
    for pair in parts.query.split("&"):
        name, eq, raw = pair.partition("=")
        if eq and is_secret_param(unquote(name)):
            found.append(raw)
    return sorted({s for s in found if s}, key=len, reverse=True)


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its query string, and the query parameters (sent separately by HTTP clients
    whose base URL cannot hold a query string, such as the openai SDK's)."""
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment))
    return base, dict(parse_qsl(parts.query, keep_blank_values=True))
