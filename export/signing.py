"""Bundle signatures: an HMAC-SHA256 of ``manifest.json`` in ``manifest.sig``, made with a shared key.

The manifest lists the sha256 of every other file of the bundle, so a valid signature over its exact
bytes vouches for the whole bundle: that the manifest (and through it every file) was written by
someone holding the key. Without it the checksums only show a bundle is intact, not who wrote it:
whoever can write the bundle volume can write a matching manifest too.

Why HMAC and not a key pair: the writer (fair-export) and the readers (the API pods) are run by the same
operator, the key is one Secret, and the readers mount the bundles read-only, so a reader holding the
signing key gains nothing it could not already do. stdlib only (hmac, hashlib): the service imports it.

Keys come from the environment (``FAIR_BUNDLE_SIGNING_KEY``), never from a command line (``ps`` shows
those). Several keys, comma-separated, are accepted when verifying (a rotation); the first one signs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

SIGNATURE_FILE = "manifest.sig"
KEY_ENV = "FAIR_BUNDLE_SIGNING_KEY"
ALGORITHM = "hmac-sha256"
# 32 characters: `openssl rand -hex 32` gives 64; a short key is a guessable one
MIN_KEY_LENGTH = 32
# the signature file is one short line; anything longer is not ours (and is not read into memory whole)
_MAX_SIGNATURE_BYTES = 1024


class SignatureError(ValueError):
    """A bundle whose signature is missing, malformed or made with another key."""


def parse_keys(text: str | None) -> list[bytes]:
    """``FAIR_BUNDLE_SIGNING_KEY``'s value as keys: comma-separated, blanks dropped; each at least
    ``MIN_KEY_LENGTH`` characters without surrounding whitespace. The error never shows a key."""
    if not text:
        return []
    keys = []
    for n, raw in enumerate(text.split(","), start=1):
        if not raw.strip():
            continue
        check_key(raw, f"{KEY_ENV} (key {n})")
        keys.append(raw.encode())
    return keys


def check_key(key: str, what: str) -> None:
    if key != key.strip():
        raise ValueError(f"{what}: has leading or trailing whitespace")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"{what}: needs at least {MIN_KEY_LENGTH} characters (e.g. openssl rand -hex 32)")


def keys_from_env(environ: os._Environ | dict[str, str] | None = None) -> list[bytes]:
    """The signing keys in the environment (``FAIR_BUNDLE_SIGNING_KEY``); [] when unset or empty."""
    env = os.environ if environ is None else environ
    return parse_keys(env.get(KEY_ENV))


def signature(manifest_bytes: bytes, key: bytes) -> str:
    """The content of ``manifest.sig`` for these manifest bytes: ``hmac-sha256:<hex>``."""
    return f"{ALGORITHM}:{hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()}\n"


def write_signature(bundle_dir: str | os.PathLike, manifest_bytes: bytes, key: bytes) -> Path:
    path = Path(bundle_dir) / SIGNATURE_FILE
    path.write_text(signature(manifest_bytes, key))
    return path


def verify(bundle_dir: str | os.PathLike, manifest_bytes: bytes, keys: Sequence[bytes]) -> None:
    """Raise ``SignatureError`` unless ``manifest.sig`` in ``bundle_dir`` is a valid signature of
    ``manifest_bytes`` (the bytes the caller parses, not a second read of the file) by one of ``keys``.
    Compared in constant time (``hmac.compare_digest``)."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise SignatureError(
            f"{path}: the bundle is not signed, and a signing key is configured ({KEY_ENV}): "
            "only bundles written by fair-export with the key are served (sign an existing one with "
            "`fair-export sign`)"
        ) from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the signature ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    algorithm, _, digest = text.partition(":")
    if len(raw) > _MAX_SIGNATURE_BYTES or algorithm != ALGORITHM or not digest:
        raise SignatureError(f"{path}: not a signature ({ALGORITHM}:<hex> expected)")
    for key in keys:
        expected = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, digest):
            return
    raise SignatureError(
        f"{path}: the signature does not match manifest.json with any configured key: the manifest was "
        "changed after signing, or signed with another key"
    )
