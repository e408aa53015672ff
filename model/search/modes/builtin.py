"""Registers the built-in search modes; ``model.search`` imports this, so they are registered before
anything in the package runs.

``BUILTIN`` order is the order of CLI choices and of ``--search auto``'s preference (exact first, for
catalogs it can score whole).
"""

from model.search.modes.ann import AnnMode
from model.search.modes.beam import BeamMode
from model.search.modes.exact import ExactMode
from model.search.modes.registry import SEARCH_MODES, register

BUILTIN = (ExactMode, BeamMode, AnnMode)

for _mode in BUILTIN:
    if _mode.name not in SEARCH_MODES:  # a reload of this module must not register twice
        register(_mode)
