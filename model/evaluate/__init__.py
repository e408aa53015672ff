"""Offline evaluation: leave-one-out metrics, the popularity baseline, model ranking and ``fair-eval``.

``metrics`` and ``popularity`` are numpy-only so that anything (the service's tests, the trainer's
validation loop) can score a ranking without pulling in torch; only ``ranking`` and ``noise`` need torch,
so nothing is imported here.
"""
