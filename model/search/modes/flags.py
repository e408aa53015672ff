"""``--search`` and the search parameters' flags of every CLI, derived from the registry.

fair-eval, fair-export and the bench scripts call ``add_search_arguments``; its choices and flags are
the registered modes and their parameters at the time the parser is built, so a new mode shows up in
every CLI without touching one. A CLI may spell a parameter's flag its own way (fair-eval's ``--beam``
is ``candidates``) — the public flags stay what they were — and ``search_settings`` reads the values
back by parameter name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from model.search.modes.base import Param
from model.search.modes.registry import AUTO, SEARCH_MODES, auto_rule, mode_names, mode_params


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {value}")
        return value

    return parse


def _dest(p: Param) -> str:
    return f"search_{p.name}"


def add_search_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: str,
    intro: str = "how items are ranked",
    auto: bool = False,
    flags: Mapping[str, str] | None = None,
    defaults: Mapping[str, int] | None = None,
) -> None:
    """Add ``--search`` (the registered modes, plus ``auto`` when ``auto``) and one flag per search
    parameter (``--<name>``, or the spelling ``flags`` gives; default from ``defaults`` or the
    parameter's). Read them back with ``search_settings(args)``."""
    flags = flags or {}
    defaults = defaults or {}
    modes = "; ".join(f"{m.name}: {m.help}" for m in SEARCH_MODES.values())
    choices = [*([AUTO] if auto else []), *mode_names()]
    rule = f"; auto: {auto_rule()}" if auto else ""
    parser.add_argument(
        "--search", choices=choices, default=default, help=f"{intro} ({modes}{rule}; default {default})"
    )
    for p in mode_params():
        users = [m.name for m in SEARCH_MODES.values() if p in m.params]
        value = defaults.get(p.name, p.default)
        flag = flags.get(p.name, "--" + p.name.replace("_", "-"))
        parser.add_argument(
            flag,
            dest=_dest(p),
            metavar=flag.lstrip("-").replace("-", "_").upper(),
            type=_at_least(p.minimum),
            default=value,
            help=f"{p.help} (--search {' / '.join(users)}; default {value})",
        )


def search_settings(args: argparse.Namespace) -> dict[str, int]:
    """The search parameters' values parsed by ``add_search_arguments``, by parameter name."""
    return {p.name: getattr(args, _dest(p)) for p in mode_params()}
