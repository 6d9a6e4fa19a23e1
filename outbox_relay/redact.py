"""Keep credentials out of logs and error messages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# libpq also takes secrets as conninfo keywords ("host=db password=x") and as URL query
# parameters ("postgresql://db/app?password=x"); sslpassword too. Quoted values may hold spaces.
_SECRET_PARAMETER = re.compile(r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``amqp://guest:secret@host/`` -> ``amqp://guest:***@host/``; unparseable URLs are hidden."""
    url = _SECRET_PARAMETER.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"
