"""The noise-injection experiment: how much do the metrics drop when random items enter a history?

FAIR's focused attention and its robustness objective are meant to ignore irrelevant history items;
this measures it. For each test user, ``n`` random catalog items are inserted at uniformly random
positions of the history the model sees, and the same run is evaluated on clean and noisy histories.

Choices (also stated in docs/benchmarks.md next to the numbers):
- Noise goes into the *visible* history (the last ``max_history`` items, as ``EvalSplit`` gives
  them). When the clean history plus the noise would exceed ``max_history``, the oldest *real* items
  are dropped, never a noise item, so every noisy history holds exactly ``n`` noise items.
  (Inserting before truncation would let most noise fall out of long histories and measure less.)
- Noise items are drawn uniformly from the catalog, distinct, never the target and never an item
  already in the history; positions are uniform over all interleavings of real and noise items.
- Seen-item exclusion uses the noisy history, as the service would exclude whatever is stored.
- Each ``n`` draws from its own generator seeded with ``(seed, n)``, so the noisy histories for one
  ``n`` do not depend on which other ``n`` are run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def insert_noise(
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    num_items: int,
    n: int,
    max_history: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per user, the history with ``n`` random catalog items inserted (see the module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= max_history:
        raise ValueError(f"n={n} noise items leave no room for real items in max_history={max_history}")
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories for {len(targets)} targets")
    out = []
    for hist, target in zip(histories, targets, strict=True):
        hist = np.asarray(hist, dtype=np.int64)[-max_history:]
        if n == 0:
            out.append(hist.copy())
            continue
        real = hist[-(max_history - n) :]
        forbidden = set(hist.tolist()) | {int(target)}
        if num_items - len(forbidden) < n:
            raise ValueError(f"catalog of {num_items} items has fewer than {n} items to insert as noise")
        noise: list[int] = []
        while len(noise) < n:  # rejection sampling: the forbidden set is tiny next to the catalog
            for item in rng.integers(0, num_items, size=n - len(noise)).tolist():
                if item not in forbidden:
                    forbidden.add(item)
                    noise.append(item)
        noisy = np.empty(len(real) + n, dtype=np.int64)
        is_noise = np.zeros(len(noisy), dtype=bool)
        is_noise[rng.choice(len(noisy), size=n, replace=False)] = True
        noisy[is_noise] = noise
        noisy[~is_noise] = real
        out.append(noisy)
    return out


def relative_drop(clean: dict[str, float], noisy: dict[str, float]) -> dict[str, float]:
    """``(clean - noisy) / clean`` per metric (positive = worse with noise; NaN where clean is 0)."""
    return {
        key: (clean[key] - noisy[key]) / clean[key] if clean[key] else float("nan") for key in METRIC_KEYS
    }


def noise_markdown(rows: Sequence[dict]) -> str:
    """A markdown table of experiment rows (``label``, ``n``, the metrics, ``drop``: relative drops)."""
    head = "| model | noise items n | Recall@5 | Recall@10 | NDCG@5 | NDCG@10 | drop R@10 | drop N@10 |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        drop = row.get("drop")
        drops = [f"{100 * drop[k]:.1f}%" if drop else "—" for k in ("recall@10", "ndcg@10")]
        metrics = " | ".join(f"{row[k]:.4f}" for k in METRIC_KEYS)
        lines.append(f"| {row['label']} | {row['n']} | {metrics} | {' | '.join(drops)} |")
    return "\n".join(lines)


def noise_experiment(
    evaluate,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    num_items: int,
    ns: Sequence[int],
    max_history: int,
    seed: int = 0,
    label: str = "model",
) -> list[dict]:
    """Rows for the clean histories (``n`` = 0) and each ``n``: metrics plus ``drop`` relative to clean.

    ``evaluate(histories) -> report`` scores one set of histories against ``targets`` (a model via
    ``ranking.evaluate_run``, or any other ranker), which keeps this function free of torch.
    """
    clean = evaluate([np.asarray(h, dtype=np.int64)[-max_history:] for h in histories])
    rows = [{"label": label, "n": 0, **clean, "drop": None}]
    for n in ns:
        rng = np.random.default_rng([seed, n])
        noisy = evaluate(insert_noise(histories, targets, num_items, n, max_history, rng))
        rows.append({"label": label, "n": n, **noisy, "drop": relative_drop(clean, noisy)})
    return rows
