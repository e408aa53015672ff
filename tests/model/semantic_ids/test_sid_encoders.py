import hashlib

import numpy as np
import pytest

from model.semantic_ids.encoders import (
    CachedEncoder,
    EncoderError,
    PrecomputedEmbeddings,
    SentenceTransformerEncoder,
    TextEncoder,
    load_embeddings,
)


class HashEncoder:
    """A tiny deterministic encoder that counts how many texts it embedded."""

    def __init__(self, model_id="hash-v1"):
        self._model_id = model_id
        self.calls = 0

    @property
    def model_id(self):
        return self._model_id

    def encode(self, texts):
        self.calls += len(texts)
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.uint8) for t in texts]
        return np.asarray(rows, dtype=np.float32)


def test_cache_hit_skips_the_encoder_and_returns_the_same_vectors(tmp_path):
    inner = HashEncoder()
    enc = CachedEncoder(inner, tmp_path)
    assert isinstance(enc, TextEncoder)
    texts = ["red lipstick", "blue nail polish", "shampoo"]
    first = enc.encode(texts)
    assert enc.last_hit is False and inner.calls == 3
    again = CachedEncoder(inner, tmp_path).encode(texts)  # a new process would see the same file
    assert inner.calls == 3
    np.testing.assert_array_equal(first, again)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_cache_key_depends_on_texts_order_and_model(tmp_path):
    inner = HashEncoder()
    enc = CachedEncoder(inner, tmp_path)
    enc.encode(["a", "b"])
    enc.encode(["b", "a"])
    assert enc.last_hit is False
    CachedEncoder(HashEncoder("hash-v2"), tmp_path).encode(["a", "b"])
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    inner = HashEncoder()
    enc = CachedEncoder(inner, tmp_path)
    enc.path_for(["x"]).parent.mkdir(parents=True, exist_ok=True)
    enc.path_for(["x"]).write_bytes(b"not numpy")
    out = enc.encode(["x"])
    assert enc.last_hit is False and out.shape == (1, 16)
    assert enc.encode(["x"]) is not None and enc.last_hit is True


def test_precomputed_embeddings_are_shape_checked(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((4, 3), dtype=np.float64))
    enc = PrecomputedEmbeddings(path)
    out = enc.encode(["a", "b", "c", "d"])
    assert out.shape == (4, 3) and out.dtype == np.float32
    with pytest.raises(EncoderError, match=r"emb\.npy: embeddings have 4 rows but the catalog has 5 items"):
        enc.encode(["a"] * 5)
    with pytest.raises(EncoderError, match="have 4 rows but the catalog has 2 items"):
        load_embeddings(path, num_items=2)


def test_bad_embedding_files_are_named_in_the_error(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones(5))
    with pytest.raises(EncoderError, match=r"flat\.npy: embeddings must be a 2-d array"):
        load_embeddings(tmp_path / "flat.npy")
    bad = np.ones((3, 2))
    bad[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(EncoderError, match=r"nan\.npy: row 1 has NaN"):
        load_embeddings(tmp_path / "nan.npy")
    with pytest.raises(EncoderError, match="no such embeddings file"):
        load_embeddings(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_text("hello")
    with pytest.raises(EncoderError, match=r"junk\.npy: not a readable \.npy"):
        load_embeddings(tmp_path / "junk.npy")


def test_local_model_path_must_be_a_model_directory(tmp_path):
    with pytest.raises(EncoderError, match="not a sentence-transformers model directory"):
        SentenceTransformerEncoder(tmp_path)


@pytest.mark.slow
def test_bundled_minilm_embeds_offline_and_keeps_input_order():
    """The one test with the real model (~9 s, mostly imports): texts of different lengths land in
    different batches, yet row i must still embed text i."""
    enc = SentenceTransformerEncoder(batch_size=2, progress=False)
    texts = [
        "red nail polish",
        "a long description of a men's electric beard trimmer with charger",
        "pink nail lacquer",
    ]
    out = enc.encode(texts)
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    sims = out @ out.T
    assert sims[0, 2] > sims[0, 1] and sims[2, 0] > sims[2, 1]
    assert enc.model_id == "sentence-transformers/all-MiniLM-L6-v2"


def test_local_model_id_changes_when_the_model_files_change(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    before = SentenceTransformerEncoder(tmp_path).model_id
    assert before.startswith(f"local:{tmp_path.resolve()}@")
    assert SentenceTransformerEncoder(tmp_path).model_id == before
    (tmp_path / "model.safetensors").write_bytes(b"new weights")
    assert SentenceTransformerEncoder(tmp_path).model_id != before
