"""One place that hides secrets in URLs: camera passwords and tokens in query strings.

Used by the log processor (every string of every event, FFmpeg's stderr included), by
`config.mask_url` for status and errors, so a URL is masked the same way wherever it shows.
"""

from __future__ import annotations

import re

# scheme://[user[:password]@]rest-up-to-whitespace-or-quote
URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s'\"<>]*)")
MASK = "***"
TRAILING = ":.,;)]}"


def mask_url(url: str) -> str:
    """A URL with its userinfo password and its query string replaced by ***.

    A whole value known to be one URL is masked by its last "@" before the query, not by
    the free-text pattern: a password may hold quotes, slashes or "#", which end a URL in
    free text but not here. Masking too much (an "@" in a path) is the safe way to err."""
    if url.startswith(("lavfi:", "sqlite:")):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return redact_text(url)
    head, question, query = rest.partition("?")
    if "@" in head:
        userinfo, host = head.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        head = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    return f"{scheme}{sep}{head}" + (f"?{MASK}" if question and query else "")


def redact_text(text: str) -> str:
    """Every URL in free text (a log line, FFmpeg's stderr) with its secrets masked."""
    if "://" not in text:
        return text
    return URL.sub(mask_match, text)


def mask_match(match: re.Match) -> str:
    # Punctuation right after a URL is the sentence's ("<url>: 401 Unauthorized").
    rest = match.group(2)
    body = rest.rstrip(TRAILING)
    return match.group(1) + mask_rest(body) + rest[len(body):]


def mask_rest(rest: str) -> str:
    authority_end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        # A lone user name is often a token itself (https://TOKEN@host/...).
        authority = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    path, sep, query = tail.partition("?")
    if sep and query:
        # Names too: cameras put tokens in odd places (?<token>, ?auth=<token>).
        tail = f"{path}?{MASK}"
    return authority + tail


def redact_value(value):
    """Strings, and strings inside lists, tuples and dicts, redacted; other values as is."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


def mask_path(url: str) -> str:
    """scheme://host/*** for URLs whose path may itself be the secret (webhook URLs such as
    https://hooks.slack.com/services/T00/B00/TOKEN, Apprise URLs)."""
    scheme, sep, rest = mask_url(url).partition("://")
    if not sep:
        return MASK
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    return f"{scheme}://{authority}/{MASK}"
