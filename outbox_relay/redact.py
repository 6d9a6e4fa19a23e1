"""Keep credentials out of logs, errors and status output.

Two layers. :func:`redact_url` masks what a URL or a libpq conninfo string carries by its shape:
the password of ``user:password@``, a bare token (``nats://TOKEN@host``), secret-looking
parameters (``?password=``, ``?token=``, ``sslpassword=``...) and every query value of an HTTP
URL (webhooks carry their credential under any name: ``?code=``, ``?sig=``, ``?key=``), whatever
characters the password holds (an unencoded ``/ # @ :`` or space included). :class:`Scrubber`
masks the literal secrets the process was configured with (each URL's password and tokens, the
webhook secret) wherever they appear: in our messages, in a third-party library's log line, in a
driver error that quotes part of a URL. It finds them however they were percent-encoded, and
also finds the pieces of a password that a parser quotes when it stopped at an unencoded ``/``
or space.
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
# The value ends at a blank, '&', ';' or a double quote (a JSON string's end: log lines in JSON
# go through here too).
_SECRET_PARAMETER = re.compile(
    rf"(\b{_SECRET_KEY}\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;\"]*)", re.IGNORECASE
)
# A scheme and its authority, up to the last '@' before the next URL, space or end of text
# (a password may hold '/', '#', '?', ':' or '@' when it was not percent-encoded).
_SCHEME = re.compile(r"\b([a-z][a-z0-9+.-]{1,15})://", re.IGNORECASE)
# Schemes whose bare user part is a secret (a token), not a user name.
_TOKEN_SCHEMES = frozenset({"nats", "tls"})
# Schemes whose query values are all masked: a webhook's credential goes by any name.
_HTTP_SCHEMES = frozenset({"http", "https"})
_QUERY_VALUE = re.compile(r"([?&][^=&#\s\"'<>]*=)([^&#\s\"'<>]+)")
_URL_END = re.compile(r"[\s\"'<>]")
# Where a parser splits a URL it misreads: the pieces of a password between these characters
# are what it quotes ("port 'abc' is not a number" for "user:abc/def@host").
_DELIMITERS = re.compile(r"[/?#@:\s%&=+;\[\]]")
# Characters that percent-encoding never changes.
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]")


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
    if at >= 0:
        userinfo, after = rest[:at], rest[at:]
        user, colon, _password = userinfo.partition(":")
        if colon:
            rest = f"{user}:{MASK}{after}"
        elif scheme in _TOKEN_SCHEMES:
            rest = f"{MASK}{after}"
    if scheme in _HTTP_SCHEMES:
        found = _URL_END.search(rest)
        end = found.start() if found else len(rest)
        rest = _QUERY_VALUE.sub(rf"\1{MASK}", rest[:end]) + rest[end:]
    return f"{match[0]}{rest}"


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
        parts = urlsplit(value)
        for key, item in parse_qsl(parts.query):
            # A webhook's query value is a secret whatever its name, unless it is short (a
            # flag like "json" would mask that word in every line).
            named = re.fullmatch(_SECRET_KEY, key, re.IGNORECASE)
            if named or (parts.scheme.lower() in _HTTP_SCHEMES and len(item) >= 8):
                found += [item, quote(item, safe="")]
    except ValueError:
        pass
    return [secret for secret in dict.fromkeys(found) if secret]


def pieces_of(secret: str) -> list[str]:
    """The parts of ``secret`` between URL delimiters, as a parser that misread it would quote
    them (``abc/def`` -> ``abc``, ``def``); the secret itself when it has no delimiter."""
    return [piece for piece in _DELIMITERS.split(secret) if piece]


def _encodings(secret: str) -> str:
    """A pattern matching ``secret`` however it was percent-encoded (each reserved character
    as itself or as %XX in either case, a space also as '+')."""
    parts = []
    for char in secret:
        if _UNRESERVED.fullmatch(char):
            parts.append(re.escape(char))
            continue
        escaped = "".join(f"%{byte:02x}" for byte in char.encode())
        options = [re.escape(char), f"(?i:{re.escape(escaped)})"]
        if char == " ":
            options.append(r"\+")
        parts.append(f"(?:{'|'.join(options)})")
    return "".join(parts)


class Scrubber:
    """Replaces known secrets, and credentials in any URL, with ``***``."""

    # Shorter "secrets" would mangle ordinary words in every line; such values are no secret.
    MIN_LENGTH = 4
    # Pieces of a password (see pieces_of) are masked from this length: shorter ones are more
    # often ordinary words, and reveal little of the password.
    MIN_PIECE = 6

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, values: Iterable[str]) -> None:
        for value in values:
            for secret in secrets_in(value):
                if len(secret) >= self.MIN_LENGTH:
                    self._secrets.add(secret)
                    self._secrets.update(
                        piece
                        for piece in pieces_of(secret)
                        if len(piece) >= self.MIN_PIECE and piece != secret
                    )
        # Longest first: a secret that contains another (or its piece) is masked whole.
        ordered = sorted(self._secrets, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(_encodings, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_url(text)
