"""What a search mode is: a name, its own integer parameters, and how it ranks the catalog.

A mode class is a frozen dataclass whose fields are exactly its ``params``; an instance is one
configured search (``BeamMode(candidates=200)``). Everything that names, parses or checks a mode —
CLI choices and flags, the training config, the bundle manifest — reads these class attributes
through ``model.search.modes.registry``, so a new mode is one module and one registry line.

numpy only: the service imports this package and must never pull in torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Self

import numpy as np

from model.search.item_scores import Scorer
from model.search.results import ExcludeArg, SearchResult
from model.semantic_ids.trie import CodeTrie


class SearchConfigError(ValueError):
    """A search mode or parameter that cannot be used: unknown name, wrong type, below its minimum."""


@dataclass(frozen=True)
class Param:
    """One integer parameter of a mode: its name (manifest key, keyword, CLI flag), default and least
    value, and one line of help."""

    name: str
    default: int
    minimum: int
    help: str

    def parse(self, value: object) -> int:
        """``value`` as a checked int; bools and floats are refused (a manifest's ``true`` is no width)."""
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < self.minimum:
            raise SearchConfigError(f"{self.name} must be an integer >= {self.minimum}, got {value!r}")
        return int(value)


class SearchMode(ABC):
    """Base of every search mode (see the module docstring). Subclasses set the class attributes and
    implement ``search``; those with a width to widen per request override ``at_least``."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line: what this mode does (CLI help)
    params: ClassVar[tuple[Param, ...]] = ()
    # fair-export --search auto takes the first registered mode whose limit admits the catalog (None: any)
    auto_max_items: ClassVar[int | None] = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, object] | None = None) -> SearchMode:
        """This mode configured from ``settings`` (CLI values, a manifest's ``search`` dict): its own
        parameters are read, missing ones take their defaults, keys of other modes are ignored."""
        settings = settings or {}
        return cls(**{p.name: p.parse(settings.get(p.name, p.default)) for p in cls.params})

    def settings(self) -> dict[str, int]:
        """This mode's own parameter values, by name."""
        return {p.name: getattr(self, p.name) for p in self.params}

    def describe(self) -> str:
        """``exact``, ``beam 200``: the name and the parameter values (reports, fair-eval's output)."""
        return " ".join([self.name, *(str(v) for v in self.settings().values())])

    def at_least(self, width: int) -> SearchMode:
        """This mode widened to at least ``width`` (a request's beam size, or k); modes without a
        width return themselves."""
        return self

    def check_k(self, k: int) -> None:
        """Raise ``SearchConfigError`` when this mode cannot return ``k`` items per user."""
        if k < 1:
            raise SearchConfigError(f"k must be >= 1, got {k}")

    @abstractmethod
    def search(
        self,
        scorer: Scorer,
        trie: CodeTrie,
        outputs: Sequence[np.ndarray],
        k: int,
        exclude: ExcludeArg = None,
    ) -> SearchResult:
        """Top-k items per user by the full item score, ``exclude``d items never returned. ``outputs``
        are the network outputs ``scorer`` reads (``scorer.output_names``: ``(code_scores, query)``
        for an ``ItemScorer``, ``(history,)`` for a ``FoldedScorer``)."""


class RescoresCandidates:
    """The width rules of a mode that proposes ``candidates`` items per user and rescores them with the
    full item score (beam, ann): it needs at least k candidates, and ``at_least`` widens it. A mixin
    without fields, so the dataclass fields of the mode stay exactly its params."""

    candidates: int

    def at_least(self, width: int) -> Self:
        return widened(self, "candidates", width)  # type: ignore[arg-type, return-value]

    def check_k(self, k: int) -> None:
        super().check_k(k)  # type: ignore[misc]  # SearchMode's, next in the mode's MRO
        if self.candidates < k:
            raise SearchConfigError(f"candidates ({self.candidates}) must be >= k ({k})")


def widened(mode: SearchMode, param: str, width: int) -> SearchMode:
    """``mode`` with the parameter ``param`` raised to at least ``width`` (helper of ``at_least``)."""
    current = getattr(mode, param)
    return mode if current >= width else replace(mode, **{param: width})
