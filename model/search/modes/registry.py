"""The registry of search modes: the one place that knows which modes exist and what they take.

Every list of modes in the project derives from here — fair-eval / fair-export / bench ``--search``
choices and parameter flags (``model.search.modes.flags``), ``train.eval_search``, the manifest's
``search`` field (``mode_from_manifest`` / ``manifest_entry``) and ``--search auto`` — so they cannot
drift apart. Modes register in registration order (the order of CLI choices and of ``auto``'s
preference); the built-in ones are registered by ``model/search/modes/__init__.py``.

This module imports no mode (the modes import the scoring kernels, which look modes up here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from model.search.modes.base import Param, SearchConfigError, SearchMode

AUTO = "auto"  # fair-export's --search value that picks a mode by catalog size (auto_mode)

# name -> mode class, in registration order; read it through the functions below
SEARCH_MODES: dict[str, type[SearchMode]] = {}


def register(mode: type[SearchMode]) -> type[SearchMode]:
    """Add a mode class (usable as a decorator). Its dataclass fields must be exactly its params, and
    a parameter name shared with another mode must mean the same (default and minimum)."""
    name = getattr(mode, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
        raise SearchConfigError(f"a search mode needs a plain name other than {AUTO!r}, got {name!r}")
    if name in SEARCH_MODES:
        raise SearchConfigError(f"search mode {name!r} is already registered")
    declared = {p.name for p in mode.params}
    if {f.name for f in fields(mode)} != declared:  # fields() also refuses a non-dataclass
        raise SearchConfigError(
            f"search mode {name!r}: dataclass fields must be its params {sorted(declared)}"
        )
    known = {p.name: p for p in mode_params()}
    for p in mode.params:
        if p.name == "mode" or (p.name in known and known[p.name] != p):
            raise SearchConfigError(f"search mode {name!r}: parameter {p.name!r} clashes with another")
    SEARCH_MODES[name] = mode
    return mode


def unregister(name: str) -> type[SearchMode]:
    """Remove a mode (tests register toy modes and take them out again)."""
    return SEARCH_MODES.pop(get_mode(name).name)


def mode_names() -> tuple[str, ...]:
    """Registered mode names in registration order: every CLI's and config's choices."""
    return tuple(SEARCH_MODES)


def get_mode(name: str) -> type[SearchMode]:
    """The mode class called ``name``; an unknown name is a ``SearchConfigError`` listing the modes."""
    try:
        return SEARCH_MODES[name]
    except (KeyError, TypeError):
        raise SearchConfigError(f"search mode must be one of {mode_names()}, got {name!r}") from None


def mode_params() -> tuple[Param, ...]:
    """Every parameter of every registered mode, once, in registration order: the search settings a CLI
    offers and a manifest records (``beam``'s ``candidates`` today)."""
    seen: dict[str, Param] = {}
    for mode in SEARCH_MODES.values():
        for p in mode.params:
            seen.setdefault(p.name, p)
    return tuple(seen.values())


def make_mode(name: str, settings: Mapping[str, object] | None = None) -> SearchMode:
    """The mode ``name`` configured from ``settings`` (see ``SearchMode.from_settings``)."""
    return get_mode(name).from_settings(settings)


def auto_mode(num_items: int) -> type[SearchMode]:
    """The mode ``--search auto`` serves a catalog of ``num_items`` with: the first registered one
    whose ``auto_max_items`` admits it."""
    for mode in SEARCH_MODES.values():
        if mode.auto_max_items is None or num_items <= mode.auto_max_items:
            return mode
    raise SearchConfigError(f"no registered search mode serves a catalog of {num_items} items")


def auto_rule() -> str:
    """``auto``'s rule in words, for help texts: ``exact up to 100,000 items, else beam``."""
    parts = []
    for mode in SEARCH_MODES.values():
        if mode.auto_max_items is None:
            parts.append(f"else {mode.name}" if parts else mode.name)
            break
        parts.append(f"{mode.name} up to {mode.auto_max_items:,} items")
    return ", ".join(parts)


def choose_mode(name: str, num_items: int, settings: Mapping[str, object] | None = None) -> SearchMode:
    """``make_mode``, where ``name`` may also be ``auto`` (picked by ``auto_mode``)."""
    mode = auto_mode(num_items) if name == AUTO else get_mode(name)
    return mode.from_settings(settings)


def manifest_schema() -> str:
    """What the manifest's ``search`` field must look like, for error messages."""
    params = "".join(f', "{p.name}": int >= {p.minimum}' for p in mode_params())
    return f'{{"mode": one of {list(mode_names())}{params}}}'


def mode_from_manifest(how: object) -> SearchMode:
    """A manifest's ``search`` field -> the configured mode. The mode must be registered and carry its
    own parameters; any other known parameter present must be valid too (writers record every
    parameter, ``manifest_entry``); unknown keys are ignored."""
    if not isinstance(how, Mapping):
        raise SearchConfigError(f"expected an object, got {type(how).__name__}")
    mode = get_mode(how.get("mode"))
    for p in mode_params():
        if p.name in how:
            p.parse(how[p.name])
    missing = [p.name for p in mode.params if p.name not in how]
    if missing:
        raise SearchConfigError(f"mode {mode.name!r} needs {', '.join(missing)}")
    return mode.from_settings(how)


def manifest_entry(mode: SearchMode, settings: Mapping[str, object] | None = None) -> dict:
    """The manifest's ``search`` field for ``mode``: its name and every registered parameter — the
    mode's own values, the others from ``settings`` (the CLI's) or their defaults — so a bundle says
    in full how it was configured (``{"mode": "exact", "candidates": 200}``)."""
    settings = settings or {}
    values = {p.name: p.parse(settings.get(p.name, p.default)) for p in mode_params()}
    return {"mode": mode.name, **values, **mode.settings()}
