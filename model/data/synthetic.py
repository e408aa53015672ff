"""A synthetic catalog and user histories with a learnable sequential pattern (tests, demo, scale runs).

What a next-item model can learn here, and a popularity baseline cannot:

- Every category holds a *chain*: its items in a fixed order (the order also shows in the titles,
  whose tier word climbs from "starter" to "elite" along the chain). A user who follows a
  category moves forward along its chain by 1-3 steps per click, so the next item of an interest is
  almost determined by the last item the user took from that category.
- Users hold a mixture of 1-3 interests (categories) with their own weights and interleave them, so
  the model has to look back past the newest item to the last item of the right category.
- Interests drift: now and then one interest is swapped for another (usually a sibling category of
  the same department), and an interest whose chain is used up is replaced the same way.
- A configurable share of clicks is noise: a uniformly random item that moves no chain forward.

Items carry readable text (``brand tier adjective noun`` titles, a brand, ``Department | Category``)
so a text encoder puts items of one category, and neighbouring tiers, close together: semantic IDs
built from that text carry the structure too. Everything is drawn from one ``numpy`` generator seeded
by ``seed``, and the simulation is vectorised over users (one loop over time steps only), so a
1M-item catalog takes seconds.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from model.data.benchmark import no_gc, write_benchmark
from model.data.dataset import DEFAULT_MAX_HISTORY, SequenceDataset

__all__ = ["generate_synthetic", "write_benchmark"]

# department: product nouns; each noun is one base category (and the noun in its items' titles)
_VOCABULARY = """
Beauty: lipstick, mascara, eyeliner, foundation, blush, nail polish, face cream, serum, shampoo, conditioner
Kitchen: skillet, saucepan, chef knife, cutting board, blender, kettle, coffee grinder, mixing bowl, spatula, baking sheet
Camping: tent, sleeping bag, backpack, headlamp, camp stove, water filter, trekking pole, hammock, cooler, lantern
Fitness: yoga mat, dumbbell, kettlebell, resistance band, jump rope, foam roller, pull-up bar, gym bag, water bottle, fitness tracker
Cycling: bike helmet, bike light, saddle, tire pump, bike lock, cycling gloves, chain lube, bottle cage, bike computer, pannier
Office: notebook, fountain pen, desk lamp, stapler, file organizer, planner, highlighter, desk chair, monitor stand, label maker
Audio: headphones, earbuds, speaker, soundbar, microphone, turntable, amplifier, audio cable, radio, subwoofer
Toys: puzzle, building blocks, plush bear, toy car, board game, kite, doll, train set, science kit, yo-yo
Garden: garden hose, pruning shears, watering can, planter, seed starter, rake, trowel, bird feeder, lawn sprinkler, compost bin
Pets: dog collar, cat toy, pet bed, dog leash, litter box, aquarium filter, bird cage, pet brush, chew toy, food bowl
Travel: suitcase, packing cube, travel pillow, passport wallet, luggage tag, toiletry bag, travel adapter, duffel bag, neck wallet, luggage scale
Home: throw pillow, blanket, candle, picture frame, wall clock, vase, doormat, curtain, storage basket, table lamp
Tools: drill, screwdriver set, hammer, tape measure, spirit level, wrench set, utility knife, work light, tool box, stud finder
Baby: baby bottle, pacifier, diaper bag, baby monitor, teether, stroller, baby carrier, bib, crib sheet, bath seat
Fishing: fishing rod, fishing reel, tackle box, fishing line, lure set, landing net, bait bucket, fish finder, waders, hook set
Music: guitar strings, guitar tuner, drumsticks, capo, keyboard stand, ukulele, harmonica, metronome, guitar picks, music stand
"""
# variants of every base category, used when more categories are asked for than there are nouns
_QUALIFIER_TEXT = """
Kids, Travel, Pro, Compact, Outdoor, Classic, Smart, Eco, Mini, Deluxe, Vintage, Sport, Studio,
Home, Heavy Duty, Budget, Luxury, Wireless, Family, Urban
"""
_ADJECTIVE_TEXT = """
lightweight, premium, durable, soft, bold, portable, gentle, rapid, organic, waterproof, matte,
glossy, silent, ergonomic, foldable, sleek, rugged, cozy, bright, natural, minimalist, modern,
sturdy, slim, quick, fresh, warm, cool, handy, tough
"""


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.replace("\n", ",").split(",") if w.strip()]


_DEPARTMENTS = {
    d.strip(): _words(nouns) for d, nouns in (ln.split(":") for ln in _VOCABULARY.strip().splitlines())
}
_QUALIFIERS = _words(_QUALIFIER_TEXT)
_ADJECTIVES = _words(_ADJECTIVE_TEXT)
# the position along a category's chain shows in the title: a text encoder sees "what comes next"
_TIERS = ["starter", "basic", "standard", "plus", "advanced", "pro", "expert", "elite"]
_BRAND_PARTS = (
    ["lu", "ve", "ka", "zo", "mi", "ra", "no", "ti", "sa", "be", "qu", "fi", "do", "pe", "xa", "ha"],
    ["mo", "ri", "na", "le", "xo", "ta", "vi", "ku", "se", "po", "la", "me", "di", "ro", "ga", "fe"],
    ["ra", "x", "n", "va", "lo", "ne", "ly", "on", "ix", "ta", "us", "ar", "el", "io", "um", "ka"],
)
_STEP_SIZES = np.array([1, 2, 3])
_STEP_PROBS = np.array([0.6, 0.3, 0.1])
_MAX_INTERESTS = 3


def _category_names(num_categories: int) -> tuple[list[str], np.ndarray]:
    """Readable ``Department | Category`` names and the department index of each category."""
    bases = [(d, dept, noun) for d, (dept, nouns) in enumerate(_DEPARTMENTS.items()) for noun in nouns]
    names, depts = [], []
    for c in range(num_categories):
        d, dept, noun = bases[c % len(bases)]
        variant = c // len(bases)
        label = (
            noun.title()
            if variant == 0
            else f"{_QUALIFIERS[(variant - 1) % len(_QUALIFIERS)]} {noun.title()}"
        )
        if variant > len(_QUALIFIERS):  # past the qualifiers: "Kids Tent 2", "Travel Tent 2", ...
            label = f"{label} {(variant - 1) // len(_QUALIFIERS) + 1}"
        names.append(f"{dept} | {label}")
        depts.append(d)
    return names, np.asarray(depts, dtype=np.int64)


def _brand_names(num_brands: int, rng: np.random.Generator) -> list[str]:
    a, b, c = _BRAND_PARTS
    combos = rng.permutation(len(a) * len(b) * len(c))[:num_brands]
    return [
        (a[k // (len(b) * len(c))] + b[(k // len(c)) % len(b)] + c[k % len(c)]).title()
        for k in combos.tolist()
    ]


def _default_num_categories(num_items: int) -> int:
    return int(np.clip(num_items // 40, 1, 5000))


@no_gc()
def generate_synthetic(
    num_items: int = 1000,
    num_users: int = 1000,
    noise: float = 0.1,
    seed: int = 0,
    *,
    name: str = "Synthetic",
    num_categories: int | None = None,
    mean_length: float = 9.0,
    min_length: int = 5,
    max_length: int = 50,
    drift: float = 0.1,
    max_history: int = DEFAULT_MAX_HISTORY,
    progress: bool = False,
) -> SequenceDataset:
    """Generate a catalog + chronological histories (see the module docstring for the pattern).

    ``noise`` is the share of clicks on uniformly random items; ``drift`` the per-click chance that one
    interest is swapped. Sequence lengths are ``min_length`` + a geometric tail with mean
    ``mean_length`` (Amazon-like), capped at ``max_length``; items never repeat within a user, so a
    user can end up a little shorter than drawn when the catalog is tiny. Same arguments, same data.
    ``progress`` shows a progress bar (stderr) over the simulated time steps.
    """
    if num_items < 1 or num_users < 1:
        raise ValueError(f"need at least one item and one user, got items={num_items} users={num_users}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if mean_length < min_length:
        raise ValueError(f"mean_length {mean_length} is below min_length {min_length}")
    rng = np.random.default_rng(seed)
    C = min(num_categories or _default_num_categories(num_items), num_items)

    # ---- catalog: categories, chains, brands, titles --------------------------------------------
    cat_names, cat_dept = _category_names(C)
    cat_weight = rng.gamma(2.0, size=C)
    item_cat = np.concatenate(
        [np.arange(C), rng.choice(C, size=num_items - C, p=cat_weight / cat_weight.sum())]
    )
    rng.shuffle(item_cat)  # item index (catalog order) says nothing about the category
    chain = np.argsort(item_cat, kind="stable")  # item indices grouped by category: the chains
    cat_size = np.bincount(item_cat, minlength=C)
    cat_start = np.concatenate([[0], np.cumsum(cat_size)[:-1]])
    rank = np.empty(num_items, dtype=np.int64)
    rank[chain] = np.arange(num_items) - np.repeat(cat_start, cat_size)
    tier = rank * len(_TIERS) // cat_size[item_cat]

    num_depts = int(cat_dept.max()) + 1
    brands_per_dept = int(np.clip(num_items // (40 * num_depts), 2, 4096 // num_depts))
    brand_names = _brand_names(brands_per_dept * num_depts, rng)
    item_brand = cat_dept[item_cat] * brands_per_dept + rng.integers(0, brands_per_dept, size=num_items)
    item_adj = rng.integers(0, len(_ADJECTIVES), size=num_items)
    nouns = [noun for nouns in _DEPARTMENTS.values() for noun in nouns]
    cat_noun = [nouns[c % len(nouns)] for c in range(C)]
    titles = [
        f"{brand_names[b].lower()} {_TIERS[t]} {_ADJECTIVES[a]} {cat_noun[c]}"
        for b, t, a, c in zip(
            item_brand.tolist(), tier.tolist(), item_adj.tolist(), item_cat.tolist(), strict=True
        )
    ]
    brands = [brand_names[b] for b in item_brand.tolist()]
    categories = [cat_names[c] for c in item_cat.tolist()]

    # ---- users: interests, then one vectorised loop over time -------------------------------------
    cat_pop = 1.0 / (1.0 + rng.permutation(C)) ** 0.8  # some categories are much more popular
    cat_pop /= cat_pop.sum()
    dept_cats = np.argsort(cat_dept, kind="stable")
    dept_size = np.bincount(cat_dept, minlength=num_depts)
    dept_start = np.concatenate([[0], np.cumsum(dept_size)[:-1]])

    def start_pos(cats: np.ndarray) -> np.ndarray:
        # new interests mostly start early in the chain: early tiers are the popular items
        return np.minimum(
            (rng.beta(1.0, 3.0, size=cats.shape) * cat_size[cats]).astype(np.int64), cat_size[cats] - 1
        )

    def related(cats: np.ndarray) -> np.ndarray:
        # 70%: a sibling category of the same department; else a popular category anywhere
        d = cat_dept[cats]
        sib = dept_cats[dept_start[d] + (rng.random(cats.shape) * dept_size[d]).astype(np.int64)]
        anywhere = rng.choice(C, size=cats.shape, p=cat_pop)
        return np.where(rng.random(cats.shape) < 0.7, sib, anywhere)

    U, K = num_users, _MAX_INTERESTS
    lengths = min_length + rng.geometric(1.0 / (mean_length - min_length + 1.0), size=U) - 1
    lengths = np.minimum(lengths, max_length)
    steps = int(lengths.max()) + 10  # a few spare clicks to make up for dropped repeats
    active = np.arange(K)[None, :] < rng.integers(1, K + 1, size=U)[:, None]  # [U, K]
    weight = rng.gamma(1.0, size=(U, K)) * active
    cum_weight = np.cumsum(weight, axis=1) / weight.sum(axis=1, keepdims=True)
    slot_cat = rng.choice(C, size=(U, K), p=cat_pop)
    slot_pos = start_pos(slot_cat)
    clicks = np.empty((U, steps), dtype=np.int64)
    users = np.arange(U)
    for t in tqdm(range(steps), desc="simulating clicks", unit="step", disable=not progress):
        slot = np.minimum((rng.random(U)[:, None] > cum_weight).sum(axis=1), K - 1)  # [U] by weight
        drifting = rng.random(U) < drift
        cat = slot_cat[users, slot]
        pos = slot_pos[users, slot]
        exhausted = pos >= cat_size[cat]
        swap = drifting | exhausted
        if swap.any():
            new_cat = related(cat[swap])
            cat[swap], pos[swap] = new_cat, start_pos(new_cat)
        noisy = rng.random(U) < noise
        clicks[:, t] = np.where(noisy, rng.integers(0, num_items, size=U), chain[cat_start[cat] + pos])
        slot_cat[users, slot] = cat
        slot_pos[users, slot] = np.where(noisy, pos, pos + rng.choice(_STEP_SIZES, size=U, p=_STEP_PROBS))

    # ---- drop repeats (first click of an item wins), cut to the drawn lengths --------------------
    key = (users[:, None] * num_items + clicks).ravel()
    order = np.argsort(key, kind="stable")  # stable: among equal keys the earliest click first
    repeat = np.zeros(key.size, dtype=bool)
    repeat[order[1:]] = key[order[1:]] == key[order[:-1]]
    keep = ~repeat.reshape(U, steps)
    keep &= np.cumsum(keep, axis=1) <= lengths[:, None]
    counts = keep.sum(axis=1)
    sequences = np.split(clicks[keep], np.cumsum(counts)[:-1])

    return SequenceDataset(
        name=name,
        item_ids=[str(i + 1) for i in range(num_items)],
        item_fields={"title": titles, "brand": brands, "categories": categories},
        user_ids=[str(u + 1) for u in range(U)],
        sequences=sequences,
        max_history=max_history,
        item_meta={"asin": [f"S{i + 1:09d}" for i in range(num_items)]},
    )
