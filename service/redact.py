"""Redis URLs with their secrets hidden, for every log line and message that shows one.

A Redis URL may carry a password in two places: the user-info part (``redis://user:PASSWORD@host``,
``redis://:PASSWORD@host``; a lone ``redis://TOKEN@host`` is a password to some clients) and, for
redis-py, a query argument (``?password=...``). ``redact_url`` replaces both with ``***`` and keeps
everything else (scheme, user name, host, port, db), which is what an operator needs to tell where a
tool connected. ``has_secret`` says whether a URL carries one: command-line flags refuse such URLs,
because every user of the machine sees a process's arguments (``ps``); the URL goes in
``FAIR_REDIS_URL`` instead.

Parsing is deliberately crude and errs towards hiding: everything between ``://`` and the LAST ``@`` is
user info (an unencoded ``@``, ``/`` or ``#`` in a password still ends up hidden), and no exception is
ever raised, whatever the input.
"""

from __future__ import annotations

import re

MASK = "***"
# Query arguments that hold secrets: redis-py passes unknown ones to the connection (``password``,
# ``ssl_password``); anything naming a password, secret, token or auth is hidden.
_SECRET_QUERY = re.compile(r"([?&;][^=&;#]*(?:pass|secret|token|auth)[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def redact_url(url: str | None) -> str:
    """``url`` with its password(s) replaced by ``***``; ``None`` becomes ``"(none)"``."""
    if url is None:
        return "(none)"
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL at all: hide anything that looks like user info
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:{MASK}" if colon and not re.search(r"[/?#]", user) else MASK
        rest = f"{shown}@{hostpart}"
    rest = _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, rest)
    return f"{scheme}{sep}{rest}"


def has_secret(url: str | None) -> bool:
    """Whether ``url`` carries a password (or anything ``redact_url`` would hide)."""
    return url is not None and redact_url(url) != str(url)


def flag_refusal(prog: str, flag: str, env: str = "FAIR_REDIS_URL") -> str:
    """The message of a CLI that was given a URL with a password on its command line."""
    return (
        f"{prog}: {flag} carries a password, and a command line is visible to every user of the machine "
        f"(ps, /proc). Put the URL in the environment variable {env} instead (e.g. from a secret store); "
        f"{flag} takes only URLs without credentials."
    )
