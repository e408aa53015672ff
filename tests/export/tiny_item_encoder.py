"""Builders for item-encoder tests: a tiny random sentence-transformers model (built offline) and a
fair-train-shaped run whose semantic-ID table was built from it by ``fair-sid build``'s pipeline, so
``fair-export --item-encoder`` can ship it (tests/export and tests/service use them).

The tiny model is a 2-layer BERT of width 32 over a 100-odd word vocabulary with a real WordPiece fast
tokenizer (``tokenizers``), mean pooling and normalisation: the structure of all-MiniLM-L6-v2 at a
size that exports in seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.data.benchmark import write_benchmark
from model.data.dataset import SequenceDataset
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.build import BuildConfig, build_semantic_ids
from model.semantic_ids.encoders import SentenceTransformerEncoder
from model.semantic_ids.table import SemanticIdTable
from model.train.checkpoint import save_checkpoint, untrained_checkpoint

_WORDS = (
    "red blue green black white pink gold silver matte glossy shiny soft hard long short light dark "
    "lipstick mascara cream lotion serum shampoo conditioner brush comb polish gloss powder foundation "
    "perfume soap oil mask gel spray balm liner shadow blush primer toner cleanser scrub wash mist "
    "acme nova luxe pure glow bloom velvet silk rose lily mint vanilla honey cocoa citrus ocean "
    "title brand categories beauty makeup skin hair nails fragrance care tools face eyes lips body"
)
WORDS = _WORDS.split(" ")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
HIDDEN = 32
MAX_SEQ = 24  # short, so the tests also truncate
ITEMS = 150
LEVELS = 2  # quantized levels; + the collision code = 3 = tiny FAIR's num_levels
VOCAB = 16
MAX_HISTORY = 6


def item_text(rng: np.random.Generator) -> str:
    words = rng.choice(WORDS[:-16], size=int(rng.integers(2, 6)))
    return f"title: {' '.join(words)}; brand: {rng.choice(WORDS[40:56])}"


def build_sentence_model(out: Path, seed: int = 0) -> Path:
    """A sentence-transformers model directory (Transformer + mean Pooling + Normalize), random weights."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers 6 moved the modules (the old path warns)
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # pragma: no cover
        from sentence_transformers import models  # type: ignore[no-redef]
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(":;,.-'!")
    vocab_list = [*SPECIALS, *dict.fromkeys(WORDS), *letters, *(f"##{c}" for c in letters)]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    raw = out / "raw"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # as BERT's (MiniLM's)
    )
    fast.save_pretrained(raw)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=MAX_SEQ)
    pooling = models.Pooling(HIDDEN, "mean")
    st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    st.save(str(out / "st"))
    return out / "st"


@dataclass
class ItemEncoderRun:
    run: Path
    data: Path
    sentence: Path
    dataset: SequenceDataset
    table: SemanticIdTable
    model: FAIR


def build_item_encoder_run(tmp: Path, text: bool = False, seed: int = 0) -> ItemEncoderRun:
    """A run directory (checkpoint, semantic_ids.npz with its quantizer, popular.npy) around an untrained
    tiny FAIR network over ``ITEMS`` items whose texts the tiny sentence model embedded; ``text``: the
    network has the projected text part (``model.item_text``)."""
    tmp = Path(tmp)
    sentence = build_sentence_model(tmp / "sentence", seed)
    rng = np.random.default_rng(seed)
    texts = [item_text(rng) for _ in range(ITEMS)]
    sequences = [
        rng.choice(ITEMS, size=int(rng.integers(3, 9)), replace=False).astype(np.int64) for _ in range(80)
    ]
    dataset = SequenceDataset(
        name="TinyText",
        item_ids=[f"item{i}" for i in range(ITEMS)],
        item_fields={"title": texts},
        user_ids=[f"user{u}" for u in range(len(sequences))],
        sequences=sequences,
        max_history=MAX_HISTORY,
    )
    data = write_benchmark(dataset, tmp / "data")
    encoder = SentenceTransformerEncoder(sentence, progress=False)
    table = build_semantic_ids(
        dataset, encoder, BuildConfig(method="rqkmeans", levels=LEVELS, codebook_size=VOCAB), progress=False
    )
    run = tmp / "run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    extra = {"item_text": True, "text_dim": HIDDEN} if text else {}
    cfg = FAIRConfig(
        num_levels=LEVELS + 1, codebook_size=VOCAB, max_items=8, d_model=16, n_layers=2, n_heads=2,
        mlp_ratio=2, dropout=0.0, num_items=ITEMS, **extra,
    )  # fmt: skip
    model = FAIR(cfg)
    with torch.no_grad():
        model.head_bias.normal_(0.0, 2.0)
        model.item_bias.normal_(0.0, 2.0)
        model.item_trained[::5] = False
        if text:
            model.item_text.copy_(torch.from_numpy(encoder.encode(dataset.item_texts())))
    table.save(run / "semantic_ids.npz")
    np.save(run / "popular.npy", np.arange(ITEMS, dtype=np.int64)[::-1].copy())
    (run / "metrics.json").write_text(json.dumps({}))
    save_checkpoint(
        run / "best.pt",
        untrained_checkpoint(
            model.state_dict(),
            cfg.to_dict(),
            table.sha256(),
            {"max_history": MAX_HISTORY},
            dataset.fingerprint(),
        ),
    )
    return ItemEncoderRun(run, data, sentence, dataset, table, model.eval())
