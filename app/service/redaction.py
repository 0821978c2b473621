"""No absolute server path in a response: job errors and tracking links name files, not where they live."""

from __future__ import annotations

import re

# An absolute path, alone or in a sqlite:/file: URI; not the path of an http URL nor a models:/ URI.
PART = r"[^\s/'\"(),;:]"
ABSOLUTE_PATH = re.compile(rf"(?:\b(?P<scheme>sqlite|file):/+|(?<![\w.\-:/])/)(?:{PART}+/)+(?P<last>{PART}*)")


def shortened(match: re.Match) -> str:
    scheme = f"{match['scheme']}:" if match["scheme"] else ""
    return f"{scheme}…/{match['last']}"


def without_server_paths(value):
    """``value`` (a string, or dicts and lists of them) with each absolute path cut to ``…/<last part>``."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(shortened, value)
    if isinstance(value, dict):
        return {key: without_server_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_server_paths(item) for item in value]
    return value


# A back-end's address in an error text: a URL (http, redis, …), urllib3's ``host='…', port=…``, or a host:port
# (an IP address, a dotted name or localhost).
SERVER_ADDRESS = re.compile(
    r"\b(?:https?|rediss?|unix)://[^\s'\"<>),]+"
    r"|host='[^']*', port=\d+"
    r"|(?<![\w.-])(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9A-Fa-f:]+\]|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+):\d{1,5}\b"
)


def without_server_addresses(text: str) -> str:
    """``text`` (an error a client will read) with the back-ends' URLs and host:port cut to ``…``: which Redis or
    MLflow server failed is for the log, not for a client."""
    return SERVER_ADDRESS.sub("…", text)
