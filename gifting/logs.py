"""Structured logs: one event name plus fields, readable by default, JSON on demand.

    2026-11-29T15:41:23.120Z INFO conn.open conn=a1b2.7 peer=10.0.0.5:51234 proto=json
    {"time": "2026-11-29T15:41:23.120Z", "level": "INFO", "event": "conn.open", "conn": ...}

Call sites say ``event(log, logging.INFO, "conn.open", conn=..., peer=...)``. Tokens,
secrets and passwords never become fields: the hub logs the user a token
named, never the token, and store URLs go through ``redact_url`` first. As a
second line of defence both formats scrub what looks like a token from the
whole line (a library's debug line can carry a ``?token=`` request path).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "event", "redact_url", "scrub", "setup"]

FORMATS = ("text", "json")
_FIELDS = "gifting_fields"
# A value that would break ``k=v`` parsing is written as a JSON string.
_PLAIN = re.compile(r"[^\s\"=\\]{1,200}")
_SCRUB = (
    (re.compile(r"(?i)([?&;]token=)[^&\s\"'\\]+"), r"\1***"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+"), "<token>"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"'\\]+"), r"\1***"),
)


def scrub(line: str) -> str:
    """Mask query tokens, JWTs and bearer credentials anywhere in ``line``."""
    for pattern, repl in _SCRUB:
        line = pattern.sub(repl, line)
    return line


def event(
    logger: logging.Logger, level: int, name: str, /, *, exc_info: bool = False, **fields: Any
) -> None:
    """Log event ``name`` with ``fields``, if ``level`` is enabled (cheap when it is not)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, exc_info=exc_info, extra={_FIELDS: fields}, stacklevel=2)


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``.

    Whatever stands before ``@`` is treated as a credential unless it is a bare
    user name with a password after it: a cluster URL may carry a password
    alone (``redis+cluster://secret@h1:7000,h2:7000``). A ``password=`` query
    parameter is masked too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        cred, _, host = netloc.rpartition("@")
        user = cred.partition(":")[0] if ":" in cred else ""
        netloc = f"{user}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password|pass|pwd)=[^&]*", r"\1\2=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _time(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, _FIELDS, {})
    return fields


def _text_value(v: Any) -> str:
    s = v if isinstance(v, str) else ("-" if v is None else str(v))
    return s if _PLAIN.fullmatch(s) else json.dumps(s, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_time(record), record.levelname, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
        }
        for k, v in _fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return scrub(json.dumps(out, ensure_ascii=False, default=str))


def setup(fmt: str = "text", level: str | int = "INFO") -> None:
    """One handler on stderr for the whole process (``serve`` calls it once)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # websockets logs every failed handshake at INFO; its errors still show.
    logging.getLogger("websockets").setLevel(logging.WARNING)
