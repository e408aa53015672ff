"""The search modes, one module each (``exact.py``, ``beam.py``), their base class (``base.py``) and
registry (``registry.py``); ``builtin.py`` registers the built-in ones.

Adding a mode: write ``model/search/modes/<name>.py`` (a ``SearchMode`` subclass, see ``base.py``) and
add it to ``BUILTIN`` in ``builtin.py``. Nothing is imported here, so the registry can be imported by
the scoring kernels the modes themselves import (no import cycle).
"""
