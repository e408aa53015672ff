"""The optimizer's parameter groups: defined by the network (``FAIR.optimizer_groups``), used as they
are by the trainer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import TINY

from model.data.loading import load_dataset
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.table import SemanticIdTable
from model.train.config import load_config
from model.train.trainer import Trainer

torch.set_num_threads(1)
BASE = dict(codebook_size=8, num_levels=3, d_model=16, n_layers=2, n_heads=2, num_items=12)
VARIANTS = {
    "default": {},
    "codes_tokens_untied_user": dict(item_tokens="codes", tie_output=False, user_buckets=5),
    "no_item_ids": dict(item_ids=False, num_items=0),
    "item_text": dict(item_text=True, text_dim=6),
    "standard_attention": dict(attention="standard"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("id_decay", [0.0, 0.3])
def test_the_groups_cover_every_trainable_parameter_exactly_once(variant, id_decay):
    model = FAIR(FAIRConfig(**{**BASE, **VARIANTS[variant]}))
    groups = model.optimizer_groups(weight_decay=0.1, item_id_weight_decay=id_decay)
    seen = Counter(id(p) for g in groups for p in g["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(seen) == {id(p) for p in trainable}
    assert set(seen.values()) == {1}
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("id_decay", [0.0, 0.3])
def test_matrices_decay_embeddings_norms_and_biases_do_not_unless_it_is_the_id_table(id_decay):
    model = FAIR(FAIRConfig(**{**BASE, "tie_output": False, "user_buckets": 5}))
    groups = model.optimizer_groups(weight_decay=0.1, item_id_weight_decay=id_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [[names[id(p)] for p in g["params"]] for g in groups]
    assert [g["weight_decay"] for g in groups] == ([0.1, 0.0, 0.3] if id_decay else [0.1, 0.0])
    decayed, undecayed = by_group[0], by_group[1]
    params = dict(model.named_parameters())
    assert decayed == [n for n, p in params.items() if p.ndim >= 2 and "emb" not in n]
    assert {"head_proj", "head_out", "id_query.weight", "blocks.0.mlp.0.weight"} <= set(decayed)
    assert "head_bias" in decayed  # [L, V]: two-dimensional, so it decays like the matrices
    assert {"code_emb.weight", "pos_emb.weight", "user_emb.weight", "ln_f.weight", "ln_f.bias"} <= set(
        undecayed
    )
    assert "mi_log_scale" in undecayed and "item_bias" in undecayed
    assert ("item_emb.weight" in undecayed) == (id_decay == 0)
    if id_decay:
        assert by_group[2] == ["item_emb.weight"]
    # named_parameters order inside each group: the optimizer state of a checkpoint is indexed by it
    order = list(names.values())
    for group in by_group:
        assert group == sorted(group, key=order.index)


def test_the_trainer_optimizes_the_model_groups_with_the_run_hyper_parameters(synth, tmp_path):
    spec, sid = synth
    sets = [*TINY, "train.weight_decay=0.05", "train.item_id_weight_decay=0.2", "train.lr=0.003"]
    cfg = load_config(None, sets)
    trainer = Trainer(cfg, load_dataset(spec), SemanticIdTable.load(sid), tmp_path / "run", progress=False)
    expected = trainer.model.optimizer_groups(0.05, 0.2)
    got = trainer.optimizer.dense.param_groups
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        assert [id(p) for p in g["params"]] == [id(p) for p in e["params"]]
        assert g["weight_decay"] == e["weight_decay"]
        assert g["initial_lr"] == 0.003 and g["betas"] == tuple(cfg.train.betas)
    assert isinstance(trainer.optimizer.dense, torch.optim.AdamW) and trainer.optimizer.sparse is None
