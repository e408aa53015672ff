"""Semantic IDs for an expanded catalog: each copy keeps its source item's code tuple plus its variant.

``fair-data expand`` grows a catalog by copies: copy ``b`` of item ``i`` has ``i``'s text plus a variant
number. Run through ``fair-sid build``, every copy of an item embeds to nearly the same vector (the
variant number barely moves a sentence embedding; on a 3x expansion of Beauty 92% of the items landed in
collision groups of up to 93), so the quantizer gives the copies one code tuple and only the collision
code tells them apart; at 83 copies the groups pass the 256-code collision codebook. The embedding stage
alone also costs hours at 1M texts on a small CPU machine (bench/bench_sid_scale.py measures it).

The expanded table says directly what that quantizer converges to: copy ``b`` of source item ``i`` gets

    codes(b, i) = codes_source(i) ++ digits_V(b)

the source's whole tuple (its quantized levels and its collision code) followed by the variant number
written in base ``V`` (the codebook size) with as many digits as the largest variant needs (one for
``K_i <= V`` copies). Tuples are unique because the source's are and the variant differs between copies;
copies of an item share every level of their source's code (they are the same product to the code part
of the score) and the model's item-ID part tells them apart, as it does for a real collision group.
This is a table for scale work on expanded data, not a replacement for ``fair-sid build`` on a real
catalog.
"""

from __future__ import annotations

import numpy as np

from model.semantic_ids.table import SemanticIdError, SemanticIdTable


def variant_digits(max_variant: int, codebook_size: int) -> int:
    """How many base-``codebook_size`` digits write every variant number up to ``max_variant``."""
    if codebook_size < 2:
        raise SemanticIdError(f"codebook size must be >= 2, got {codebook_size}")
    digits, reach = 1, codebook_size
    while max_variant >= reach:
        digits += 1
        reach *= codebook_size
    return digits


def expand_semantic_ids(
    source: SemanticIdTable, item_ids: list[str], source_ids: list[str], variants: list[int] | np.ndarray
) -> SemanticIdTable:
    """The table of an expanded catalog: ``item_ids[k]`` is variant ``variants[k]`` of the source item
    ``source_ids[k]`` (an id of ``source``). Raises ``SemanticIdError`` on an unknown source id, a
    negative variant, or two items with the same (source, variant)."""
    n = len(item_ids)
    if len(source_ids) != n or len(variants) != n:
        raise SemanticIdError(
            f"item_ids, source_ids and variants must have one entry per item, got {n}, {len(source_ids)}, "
            f"{len(variants)}"
        )
    index = source.index_of()
    missing = next((s for s in source_ids if s not in index), None)
    if missing is not None:
        raise SemanticIdError(
            f"source item {missing!r} is not in the source semantic-ID table ({source.num_items} items): "
            "pass the table built for the dataset the expansion was made from"
        )
    variant = np.asarray(variants, dtype=np.int64)
    if n and variant.min() < 0:
        raise SemanticIdError(f"variant numbers must be >= 0, found {int(variant.min())}")
    src = np.fromiter((index[s] for s in source_ids), dtype=np.int64, count=n)
    v = source.codebook_size
    digits = variant_digits(int(variant.max()) if n else 0, v)
    tail = np.stack([(variant // v**d) % v for d in reversed(range(digits))], axis=1)  # [N, digits]
    codes = np.concatenate([source.codes[src], tail], axis=1)  # [N, L_source + digits]
    if n and len(np.unique(src * (int(variant.max()) + 1) + variant)) != n:
        raise SemanticIdError("two items are the same variant of the same source item")
    meta = {
        "method": "expanded",
        "source_method": source.meta.get("method"),
        "source_items": source.num_items,
        "variant_digits": digits,
    }
    return SemanticIdTable(item_ids=list(item_ids), codes=codes, codebook_size=v, meta=meta)
