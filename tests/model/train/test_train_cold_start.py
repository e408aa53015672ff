"""Items that arrive after training (a semantic ID, no interaction) stay recommendable through their codes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from conftest import random_unique_codes

from model.data.loading import load_dataset
from model.evaluate.ranking import item_scorer
from model.search.inputs import histories_to_inputs
from model.search.scoring import exact_search
from model.semantic_ids.table import SemanticIdTable
from model.train.config import load_config
from model.train.trainer import Trainer

torch.set_num_threads(1)
SPEC = "synthetic:items=150,users=900,seed=4"


def test_items_without_interactions_rank_by_their_codes(tmp_path):
    full = load_dataset(SPEC)
    counts = np.bincount(np.concatenate(full.sequences), minlength=full.num_items)
    rng = np.random.default_rng(0)
    # cold items: each is the "twin" of a frequent item (same codes but the last), with no interaction
    twins = np.argsort(-counts)[:12]
    cold = rng.choice(np.setdiff1d(np.arange(full.num_items), twins), size=12, replace=False)
    codes = random_unique_codes(full.num_items, 3, 16, seed=5)
    used = {tuple(c) for c in codes}
    for c, t in zip(cold, twins, strict=True):
        used.discard(tuple(codes[c]))
        last = next(v for v in range(16) if (*codes[t][:2], v) not in used)
        codes[c] = (*codes[t][:2], last)
        used.add(tuple(codes[c]))
    dropped = np.isin(np.arange(full.num_items), cold)
    sequences = [s[~dropped[s]] for s in full.sequences]
    keep = [i for i, s in enumerate(sequences) if len(s) >= 5]
    data = replace(
        full,
        user_ids=[full.user_ids[i] for i in keep],
        sequences=[sequences[i] for i in keep],
        _item_index=None,
    )
    table = SemanticIdTable(data.item_ids, codes, 16)
    sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "train.batch_size=64",
            "train.warmup_steps=10", "train.max_steps=150", "train.eval_every=150", "train.lr=3e-3",
            "train.eval_users=100"]  # fmt: skip
    trainer = Trainer(load_config(None, sets), data, table, tmp_path / "run", progress=False)
    trainer.fit()
    model = trainer.model.eval()

    # the bundle-side facts: cold items have no trained ID embedding, so their ID part is exactly 0
    assert not model.item_trained[torch.from_numpy(cold)].any()
    assert model.item_trained.sum().item() == full.num_items - len(cold)
    scorer = item_scorer(model, table)
    assert (scorer.vectors[cold] == 0).all() and (scorer.bias[cold] == 0).all()

    # users whose next item is a frequent twin: its cold twin scores like the twin's codes say
    split = data.eval_split("test")
    users = [i for i, t in enumerate(split.targets) if t in set(twins) and len(split.histories[i])]
    hist = [split.histories[i] for i in users]
    inputs = histories_to_inputs(hist, table.codes, 20)
    with torch.no_grad():
        cs, q = (t.numpy() for t in model.next_item_scores(*(torch.from_numpy(a) for a in inputs)))
    scores = scorer.all_scores(cs, q)
    assert np.isfinite(scores).all()
    twin_of = dict(zip(twins.tolist(), cold.tolist(), strict=True))
    cold_cols = np.array([twin_of[int(split.targets[i])] for i in users])
    rank = (scores > scores[np.arange(len(users)), cold_cols][:, None]).sum(1)
    # the cold twin ranks in the top quarter of 150 items on average (chance: the middle, ~75)
    assert rank.mean() < 0.25 * full.num_items, rank
    # and it is actually recommended: in the exact top-10 of some of these users
    top = exact_search(scorer, cs, q, k=10, exclude=hist).items
    assert np.isin(top, cold).any()
