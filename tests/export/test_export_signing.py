"""Bundles are trusted for what they are, not for where they sit (issue 24.2): signatures, caps on what a
manifest may ask for, no symlinks or files others may write, no compressed archives.

Each test fails on the code before the fix: bundles were unsigned, any manifest value was taken, and
symlinked or group-writable files were read like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile

import numpy as np
import pytest
from tiny_export import tiny_table

from export.bundle import (
    MAX_CANDIDATES,
    MAX_CODE_LENGTH,
    MAX_CODEBOOK_SIZE,
    MAX_HISTORY_ITEMS,
    MAX_ITEMS,
    MAX_NPROBE,
    MAX_WIDTH,
    BundleChecksumError,
    BundleError,
    BundleLimitError,
    BundleSignatureError,
    UnsafeBundleError,
    check_limits,
    load_bundle,
    read_manifest,
    save_folded,
    save_trie,
    sha256_file,
    sign_bundle,
    utc_now,
    verify_checksums,
    write_bundle,
)
from export.cli import main
from export.signing import KEY_ENV, SIGNATURE_FILE, parse_keys
from model.search.folded import CodeHeads, FoldedScorer
from model.search.modes.ann import default_nlist
from model.semantic_ids.trie import CodeTrie

KEY = b"k" * 16 + b"0123456789abcdef0123"  # 36 characters
OTHER = b"o" * 40


@pytest.fixture
def parts(tmp_path):
    """Files and manifest of a small valid bundle (model.onnx content is irrelevant here)."""
    table = tiny_table()
    table.save(tmp_path / "sid.npz")
    save_trie(CodeTrie.from_codes(table.codes, table.codebook_size), tmp_path / "trie.npz")
    np.save(tmp_path / "pop.npy", np.array([3, 1, 2], dtype=np.int64))
    rng = np.random.default_rng(0)
    n, d = table.num_items, 4
    heads = CodeHeads(
        rng.standard_normal((d, table.code_length, table.codebook_size)).astype(np.float32),
        rng.standard_normal((table.code_length, table.codebook_size)).astype(np.float32),
    )
    folded = tmp_path / "folded"
    folded.mkdir()
    save_folded(
        FoldedScorer(
            table.codes, rng.standard_normal((n, d)).astype(np.float32), np.zeros(n, np.float32), heads
        ),
        folded,
    )
    files = {
        "model.onnx": b"not really onnx",
        "semantic_ids.npz": tmp_path / "sid.npz",
        **{name: folded / name for name in ("item_table.npy", "item_bias.npy", "code_heads.npz")},
        "trie.npz": tmp_path / "trie.npz",
        "popular.npy": tmp_path / "pop.npy",
    }
    manifest = {
        "name": "m",
        "created": utc_now(),
        "precision": "fp32",
        "source": {},
        "model_config": {},
        "code_length": table.code_length,
        "codebook_size": table.codebook_size,
        "num_items": table.num_items,
        "max_history": 6,
        "sid_sha256": table.sha256(),
        "opset": 18,
        "inputs": [],
        "outputs": [],
        "search": {"mode": "beam", "candidates": 200, "nprobe": 96},
        "metrics": {},
        "verification": {},
        "exporter": {"name": "test"},
    }
    return files, manifest


def _edit_manifest(path, **changes):
    """Rewrite a bundle's manifest.json with ``changes`` (what someone with write access could do)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            manifest[outer] = {**manifest[outer], inner: value}
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))


# ---- signatures -------------------------------------------------------------------------------------
def test_a_signed_bundle_loads_with_its_key_and_is_refused_with_another(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files, signing_key=KEY)
    assert (path / SIGNATURE_FILE).read_text().startswith("hmac-sha256:")
    assert verify_checksums(path) == []  # the signature is not a stray file
    assert load_bundle(path, signing_keys=[KEY]).version == 1
    with pytest.raises(BundleSignatureError, match="does not match manifest.json with any configured key"):
        load_bundle(path, signing_keys=[OTHER])
    # a rotation: the new key first, the old one still accepted
    assert load_bundle(path, signing_keys=[OTHER, KEY]).version == 1


def test_an_unsigned_bundle_is_refused_when_a_key_is_configured(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    assert (
        load_bundle(path).version == 1
    )  # no key: loads as before (the service logs that it is unauthenticated)
    with pytest.raises(BundleSignatureError, match="not signed.*fair-export sign"):
        load_bundle(path, signing_keys=[KEY])
    with pytest.raises(BundleSignatureError):  # checksums off cannot skip it
        load_bundle(path, verify=False, signing_keys=[KEY])


def test_a_manifest_rewritten_after_signing_is_refused(tmp_path, parts):
    """The checksums alone are integrity, not authenticity: whoever replaces a file can rewrite its sha256
    in the manifest. With a key, that breaks the signature."""
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files, signing_key=KEY)
    np.save(path / "popular.npy", np.array([0, 0, 0], dtype=np.int64))
    _edit_manifest(path, **{"files.popular.npy": sha256_file(path / "popular.npy")})
    assert verify_checksums(path) == []  # consistent with itself ...
    assert load_bundle(path).popular.tolist() == [0, 0, 0]  # ... so without a key it is served
    with pytest.raises(BundleSignatureError, match="does not match"):
        load_bundle(path, signing_keys=[KEY])


def test_a_file_changed_after_signing_is_refused_by_its_checksum(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files, signing_key=KEY)
    np.save(path / "popular.npy", np.array([0, 0, 0], dtype=np.int64))
    with pytest.raises(BundleChecksumError, match="popular.npy: sha256"):
        load_bundle(path, verify=False, signing_keys=[KEY])  # a key always verifies the checksums


def test_a_signed_bundle_is_served_only_where_it_was_written(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files, signing_key=KEY)
    elsewhere = tmp_path / "other" / "1"
    shutil.copytree(path, elsewhere)
    with pytest.raises(BundleSignatureError, match="signed for m/1 but found in other/1"):
        load_bundle(elsewhere, signing_keys=[KEY])


def test_signing_keys_are_long_enough_and_never_echoed():
    assert parse_keys(None) == [] and parse_keys("") == [] and parse_keys(" , ") == []
    assert parse_keys(f"{KEY.decode()},{OTHER.decode()}") == [KEY, OTHER]
    for bad, message in (("short-secret-value", "at least 32"), (f" {KEY.decode()}", "whitespace")):
        with pytest.raises(ValueError, match=message) as err:
            parse_keys(bad)
        assert bad.strip() not in str(err.value)


def test_fair_export_signs_with_the_key_from_the_environment(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, f"{KEY.decode()},{OTHER.decode()}")  # the first key signs
    out = tmp_path / "bundles"
    assert main(["--run", str(tiny_run), "--out", str(out), "--name", "tiny", "--users", "8"]) == 0
    assert ", signed," in capsys.readouterr().out
    path = out / "tiny" / "1"
    assert load_bundle(path, signing_keys=[KEY]).name == "tiny"
    with pytest.raises(BundleSignatureError):
        load_bundle(path, signing_keys=[OTHER])
    assert main(["inspect", str(path)]) == 0
    assert "signature  valid" in capsys.readouterr().out
    monkeypatch.setenv(KEY_ENV, OTHER.decode())
    assert main(["inspect", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["signature"] == "INVALID" and report["problems"][0].startswith("signature:")


def test_fair_export_sign_signs_bundles_written_unsigned(tmp_path, parts, monkeypatch, capsys):
    files, manifest = parts
    model_dir = tmp_path / "m"
    for _ in range(2):
        write_bundle(model_dir, manifest, files)
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["sign", str(model_dir), "--all"]) == 2  # the key comes from the environment only
    assert "FAIR_BUNDLE_SIGNING_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert main(["sign", str(model_dir), "--all"]) == 0
    assert [load_bundle(model_dir, version=v, signing_keys=[KEY]).version for v in (1, 2)] == [1, 2]
    # a bundle that fails the checks is not signed
    broken = write_bundle(model_dir, manifest, files)
    (broken / "trie.npz").write_bytes(b"changed")
    assert main(["sign", str(broken)]) == 1
    assert "NOT signed" in capsys.readouterr().err and not (broken / SIGNATURE_FILE).exists()
    with pytest.raises(BundleChecksumError):
        sign_bundle(broken, KEY)


# ---- caps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "cap"),
    [
        ("max_history", 10**9, MAX_HISTORY_ITEMS),
        ("num_items", 10**12, MAX_ITEMS),
        ("code_length", 10**6, MAX_CODE_LENGTH),
        ("codebook_size", 2**40, MAX_CODEBOOK_SIZE),
        ("search.candidates", 10**9, MAX_CANDIDATES),
        ("search.nprobe", 10**9, MAX_NPROBE),
        ("max_history", 0, MAX_HISTORY_ITEMS),
    ],
)
def test_a_manifest_asking_for_more_than_a_cap_is_refused_naming_field_value_and_cap(
    tmp_path, parts, field, value, cap
):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    _edit_manifest(path, **{field: value})
    with pytest.raises(BundleLimitError, match=rf"{field} = {value} is outside \[1, {cap}\]"):
        read_manifest(path)
    with pytest.raises(BundleLimitError):
        load_bundle(path, verify=False)


def test_the_model_width_and_non_integer_sizes_are_capped(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    wide = [{"name": "item_inputs", "dtype": "float32", "shape": ["batch", "items", MAX_WIDTH + 1]}]
    _edit_manifest(path, inputs=wide)
    with pytest.raises(BundleLimitError, match=rf"width = {MAX_WIDTH + 1} is outside"):
        read_manifest(path)
    _edit_manifest(path, inputs=[], max_history=6.5)
    with pytest.raises(BundleLimitError, match="max_history must be an integer"):
        read_manifest(path)


def test_the_caps_admit_a_ten_million_item_catalog(parts):
    _, manifest = parts
    big = {
        **manifest,
        "num_items": 10_000_000,
        "code_length": 4,
        "codebook_size": 1024,
        "max_history": 200,
        "search": {
            "mode": "ann",
            "candidates": 1000,
            "nprobe": 256,
            "index": {"nlist": default_nlist(10**7)},
        },
        "inputs": [{"name": "item_inputs", "dtype": "float32", "shape": ["batch", "items", 512]}],
        "outputs": [{"name": "history", "dtype": "float32", "shape": ["batch", 512]}],
    }
    check_limits(big)  # no error


def test_a_compressed_archive_is_refused_before_it_is_unpacked(tmp_path, parts):
    """A deflated .npz member can unpack to gigabytes from a few KB: np.savez never compresses, so a
    compressed member is refused before any array is read."""
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    with np.load(path / "trie.npz") as arrays:
        contents = dict(arrays)
    (path / "trie.npz").unlink()
    np.savez_compressed(path / "trie.npz", **contents)
    with zipfile.ZipFile(path / "trie.npz") as z:
        assert any(m.compress_type == zipfile.ZIP_DEFLATED for m in z.infolist())
    _edit_manifest(path, **{"files.trie.npz": sha256_file(path / "trie.npz")})
    with pytest.raises(BundleLimitError, match="trie.npz: member .* is compressed"):
        load_bundle(path)


# ---- what sits in a version directory ---------------------------------------------------------------
def test_a_symlinked_file_is_refused_even_when_its_checksum_matches(tmp_path, parts):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    outside = tmp_path / "outside.npy"
    shutil.copyfile(path / "popular.npy", outside)
    (path / "popular.npy").unlink()
    (path / "popular.npy").symlink_to(outside)
    assert verify_checksums(path) == []  # the checksum follows the link ...
    with pytest.raises(UnsafeBundleError, match="popular.npy: a symlink"):  # ... the reader does not
        load_bundle(path)


def test_a_symlinked_version_directory_and_a_subdirectory_are_refused(tmp_path, parts):
    files, manifest = parts
    model_dir = tmp_path / "m"
    real = write_bundle(model_dir, manifest, files)
    elsewhere = tmp_path / "elsewhere"
    real.rename(elsewhere)
    (model_dir / "1").symlink_to(elsewhere)
    with pytest.raises(UnsafeBundleError, match="the version directory is a symlink"):
        load_bundle(model_dir)
    (model_dir / "1").unlink()
    elsewhere.rename(real)
    (real / "extra").mkdir()
    with pytest.raises(UnsafeBundleError, match="extra: not a regular file"):
        load_bundle(model_dir)


@pytest.mark.parametrize("target", ["popular.npy", "manifest.json", "."])
@pytest.mark.parametrize("bits", [0o020, 0o002])
def test_a_bundle_others_may_write_is_refused(tmp_path, parts, target, bits):
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    p = path / target
    os.chmod(p, stat.S_IMODE(p.stat().st_mode) | bits)
    with pytest.raises(UnsafeBundleError, match="writable by group or others.*chmod -R go-w"):
        load_bundle(path)
    os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~bits)
    assert load_bundle(path).version == 1


@pytest.mark.parametrize("umask", [0o002, 0o000, 0o077])
def test_bundles_are_written_never_writable_by_group_or_others_whatever_the_umask(tmp_path, parts, umask):
    files, manifest = parts
    old = os.umask(umask)
    try:
        path = write_bundle(tmp_path / "m", manifest, files, signing_key=KEY)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir()]}
    assert all(mode & 0o022 == 0 for mode in modes.values()), modes
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~(umask | 0o022)
    assert load_bundle(path, signing_keys=[KEY]).version == 1


def test_inspect_reports_unsafe_entries(tmp_path, parts, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    files, manifest = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    os.chmod(path / "trie.npz", 0o666)
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM    trie.npz: writable by group or others (mode 666)" in out
    assert "signature  none" in out


def test_write_bundle_refuses_the_signature_as_a_content_file(tmp_path, parts):
    files, manifest = parts
    with pytest.raises(BundleError, match="invalid bundle file name"):
        write_bundle(tmp_path / "m", manifest, {**files, SIGNATURE_FILE: b"hmac-sha256:00"})


def test_a_bundle_is_not_signed_into_a_directory_of_another_name(tmp_path, parts):
    files, manifest = parts
    with pytest.raises(BundleError, match="cannot be signed into another model directory"):
        write_bundle(tmp_path / "other", manifest, files, signing_key=KEY)
    assert not (tmp_path / "other").exists()
