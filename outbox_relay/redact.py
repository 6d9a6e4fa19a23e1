"""Keep credentials out of logs, errors and status output.

Two layers. :func:`redact_url` masks what a URL or a libpq conninfo string carries by its shape:
the password of ``user:password@``, a bare token (``nats://TOKEN@host``) and secret-looking
parameters (``?password=``, ``?token=``, ``sslpassword=``...), whatever characters the password
holds (an unencoded ``/ # @ :`` or space included). :class:`Scrubber` masks the literal secrets the
process was configured with (each URL's password and tokens, raw and percent-decoded, and the
webhook secret) wherever they appear: in our messages, in a third-party library's log line, in a
driver error that quotes part of a URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"

# libpq also takes secrets as conninfo keywords ("host=db password=x") and as URL query
# parameters ("postgresql://db/app?password=x"); sslpassword too; tokens in webhook or NATS URLs.
_SECRET_KEY = (
    r"\w*(?:pass(?:word|wd)?|pwd|token|secret|api_?key|apikey|signature|sig|credential)\w*"
)
_SECRET_PARAMETER = re.compile(
    rf"(\b{_SECRET_KEY}\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]*)", re.IGNORECASE
)
# A scheme and its authority, up to the last '@' before the next URL, space or end of text
# (a password may hold '/', '#', '?', ':' or '@' when it was not percent-encoded).
_SCHEME = re.compile(r"\b([a-z][a-z0-9+.-]{1,15})://", re.IGNORECASE)
# Schemes whose bare user part is a secret (a token), not a user name.
_TOKEN_SCHEMES = frozenset({"nats", "tls"})


def redact_url(url: str) -> str:
    """``amqp://guest:secret@host/`` -> ``amqp://guest:***@host/``; also any URLs inside a
    longer text. Text without credentials is returned unchanged."""
    text = _SECRET_PARAMETER.sub(rf"\1{MASK}", url)
    starts = [match.start() for match in _SCHEME.finditer(text)]
    if not starts:
        return text
    pieces = [text[: starts[0]]]
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(text)
        pieces.append(_redact_one(text[start:end]))
    return "".join(pieces)


def _redact_one(segment: str) -> str:
    """One ``scheme://...`` segment (it may run on into the text after the URL)."""
    match = _SCHEME.match(segment)
    assert match is not None
    scheme = match[1].lower()
    rest = segment[match.end() :]
    at = _userinfo_end(rest)
    if at < 0:
        return segment
    userinfo, after = rest[:at], rest[at:]
    user, colon, _password = userinfo.partition(":")
    if colon:
        masked = f"{user}:{MASK}"
    elif scheme in _TOKEN_SCHEMES:
        masked = MASK
    else:
        return segment
    return f"{match[0]}{masked}{after}"


def _userinfo_end(rest: str) -> int:
    """Index of the '@' that ends the user info (the last one on the URL's line), or -1.

    Taking the last '@' keeps an unencoded '@', '/', '#', '?' or space of a password inside the
    masked part; a later '@' in the text that follows a URL only masks a little too much."""
    return rest.split("\n", 1)[0].rfind("@")


def secrets_in(value: str) -> list[str]:
    """The secret parts of a URL or conninfo (password and tokens, raw and percent-decoded),
    or the value itself when it is not a URL (a shared secret)."""
    found: list[str] = []
    if "://" not in value and "=" not in value:
        return [value]
    for match in _SECRET_PARAMETER.finditer(value):
        secret = match[2].strip("'")
        found += [secret, unquote(secret)]
    for start in _SCHEME.finditer(value):
        rest = value[start.end() :]
        at = _userinfo_end(rest)
        if at < 0:
            continue
        userinfo = rest[:at]
        user, colon, password = userinfo.partition(":")
        if colon:
            found += [password, unquote(password)]
        elif start[1].lower() in _TOKEN_SCHEMES:
            found += [user, unquote(user)]
    try:
        for key, item in parse_qsl(urlsplit(value).query):
            if re.fullmatch(_SECRET_KEY, key, re.IGNORECASE):
                found += [item, quote(item, safe="")]
    except ValueError:
        pass
    return [secret for secret in dict.fromkeys(found) if secret]


class Scrubber:
    """Replaces known secrets, and credentials in any URL, with ``***``."""

    # Shorter "secrets" would mangle ordinary words in every line; such values are no secret.
    MIN_LENGTH = 4

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, values: Iterable[str]) -> None:
        found = set(self._secrets)
        for value in values:
            for secret in secrets_in(value):
                if len(secret) >= self.MIN_LENGTH:
                    found.add(secret)
        # Longest first: a secret that contains another is masked whole.
        self._secrets = sorted(found, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return redact_url(text)
