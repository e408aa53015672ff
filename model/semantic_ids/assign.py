"""Codes for an item the quantizer never saw: a fitted quantizer applied to new embeddings, numpy only.

``fair-sid build`` keeps the fitted quantizer's parameters in the semantic-ID table
(``SemanticIdTable.quantizer``, method in ``meta["method"]``):

* ``rqkmeans``: ``codebooks`` ``[levels, V, E]``, the centroids of every level; an embedding's code at
  level l is its residual's nearest centroid, the residual then loses that centroid.
* ``rqvae``: ``codebooks`` ``[levels, V, d]`` in the latent space, and the MLP encoder that maps an
  embedding to its latent: ``encoder_weight_{i}`` ``[out, in]`` / ``encoder_bias_{i}`` ``[out]`` for
  its linear layers, a ReLU between two of them (``model.semantic_ids.rqvae._mlp``).

The service adds items without retraining (service/new_items.py) and must never import torch, so the
quantizer is applied here with numpy, in float32 with the distance written as the quantizers write it
(``||r||^2 - 2 r.c + ||c||^2``): the codes equal the table's for nearly every catalog item (the
parity test measures the rate; a residual exactly between two centroids can round either way).

The last code of a table is the collision code (``model.semantic_ids.collisions``): it numbers the
items sharing the quantized prefix. A new item takes the smallest number its prefix does not use yet
(``next_collision_code``); when all ``V`` are taken the prefix is full (``CollisionError``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from model.semantic_ids.collisions import CollisionError

QUANTIZER_METHODS = ("rqvae", "rqkmeans")
CODEBOOKS = "codebooks"
ENCODER_WEIGHT = "encoder_weight_{}"
ENCODER_BIAS = "encoder_bias_{}"


class QuantizerError(ValueError):
    """A quantizer that cannot be applied: unknown method, missing or inconsistent arrays."""


def encoder_layers(quantizer: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The RQ-VAE encoder's linear layers ``[(weight [out, in], bias [out]), ...]``, in order."""
    layers = []
    while ENCODER_WEIGHT.format(len(layers)) in quantizer:
        i = len(layers)
        layers.append((quantizer[ENCODER_WEIGHT.format(i)], quantizer[ENCODER_BIAS.format(i)]))
    return layers


def check_quantizer(quantizer: Mapping[str, np.ndarray], method: str, levels: int, vocab: int) -> int:
    """Raise ``QuantizerError`` unless ``quantizer`` is a complete ``method`` quantizer of ``levels``
    codebooks of ``vocab`` codes; returns the embedding width it takes."""
    if method not in QUANTIZER_METHODS:
        raise QuantizerError(f"no quantizer for method {method!r} (one of {', '.join(QUANTIZER_METHODS)})")
    books = quantizer.get(CODEBOOKS)
    if books is None or books.ndim != 3 or books.shape[:2] != (levels, vocab):
        shape = None if books is None else books.shape
        raise QuantizerError(f"codebooks must be [levels={levels}, V={vocab}, dim], got {shape}")
    arrays = [books]
    if method == "rqkmeans":
        width = int(books.shape[2])
    else:
        layers = encoder_layers(quantizer)
        if not layers:
            raise QuantizerError("an rqvae quantizer needs its encoder (encoder_weight_0, ...)")
        width = int(layers[0][0].shape[1])
        previous = width
        for i, (weight, bias) in enumerate(layers):
            if weight.ndim != 2 or weight.shape[1] != previous or bias.shape != (weight.shape[0],):
                raise QuantizerError(
                    f"encoder layer {i}: weight {weight.shape} / bias {bias.shape} do not chain"
                )
            previous = int(weight.shape[0])
            arrays += [weight, bias]
        if previous != books.shape[2]:
            raise QuantizerError(
                f"the encoder outputs {previous} values, the codebooks are {books.shape[2]} wide"
            )
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise QuantizerError("quantizer arrays must hold finite floats")
    return width


def latents(quantizer: Mapping[str, np.ndarray], method: str, embeddings: np.ndarray) -> np.ndarray:
    """``[N, d]`` float32: what the codebooks quantize (the embeddings, or the RQ-VAE encoder's output)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if method == "rqkmeans":
        return x
    layers = encoder_layers(quantizer)
    for i, (weight, bias) in enumerate(layers):
        x = x @ np.asarray(weight, dtype=np.float32).T + np.asarray(bias, dtype=np.float32)
        if i < len(layers) - 1:
            np.maximum(x, 0.0, out=x)
    return x


def quantized_prefix(quantizer: Mapping[str, np.ndarray], method: str, embeddings: np.ndarray) -> np.ndarray:
    """``[N, levels]`` int64: every row's quantized codes (the table's codes minus the collision code)."""
    residual = latents(quantizer, method, embeddings).copy()
    books = np.asarray(quantizer[CODEBOOKS], dtype=np.float32)
    codes = np.empty((residual.shape[0], books.shape[0]), dtype=np.int64)
    for level, book in enumerate(books):
        dist = (
            np.einsum("nd,nd->n", residual, residual)[:, None]
            - 2.0 * (residual @ book.T)
            + np.einsum("kd,kd->k", book, book)[None, :]
        )
        codes[:, level] = dist.argmin(axis=1)
        residual -= book[codes[:, level]]
    return codes


def next_collision_code(codes: np.ndarray, prefix: np.ndarray, vocab: int) -> int:
    """The smallest collision code (last column of ``codes`` ``[N, L]``) that no row with the quantized
    ``prefix`` ``[L - 1]`` uses; ``CollisionError`` when all ``vocab`` are taken."""
    codes = np.asarray(codes, dtype=np.int64)
    prefix = np.asarray(prefix, dtype=np.int64)
    same = np.all(codes[:, :-1] == prefix[None, :], axis=1) if len(codes) else np.zeros(0, dtype=bool)
    used = np.zeros(vocab, dtype=bool)
    used[codes[same, -1]] = True
    free = np.flatnonzero(~used)
    if not free.size:
        raise CollisionError(
            f"the semantic-ID prefix {prefix.tolist()} already numbers {vocab} items (the collision code's "
            "codebook size): no room for another item with it"
        )
    return int(free[0])
