"""``fair-export``: write a model bundle from a run or checkpoint; ``fair-export inspect`` checks one.

    fair-export --run RUN_DIR --out BUNDLE_ROOT [--name NAME] [--version V] [--quantize int8 | --fp16]
    fair-export --checkpoint FILE [--sid FILE] [--popular FILE] --out BUNDLE_ROOT ...
    fair-export inspect BUNDLE_DIR [--json]
    fair-export sign BUNDLE_DIR [--version V | --all]

Signing: with ``FAIR_BUNDLE_SIGNING_KEY`` in the environment (never an argument: ``ps`` shows those)
the bundle is signed with its first key (``manifest.sig``), ``inspect`` checks the signature, and
``sign`` signs bundles written before the key existed.

Exit status: 0 on success, 1 for a failed export / a bundle with problems, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export import signing
from export.bundle import (
    BundleError,
    list_versions,
    read_manifest,
    resolve_bundle,
    sign_bundle,
    unsafe_entries,
    verify_checksums,
)
from export.search_choice import MEASURE_ABOVE_ITEMS, MIN_RECALL10
from model.search.modes.flags import add_search_arguments, search_settings
from model.search.modes.registry import AUTO, SEARCH_MODES, mode_from_manifest

EPILOG = """examples:
  fair-export --run runs/beauty --out bundles --name beauty            # next version, fp32, verified
  fair-export --run runs/beauty --data ../shared/data/amazon/Beauty --out bundles --quantize int8
  fair-export inspect bundles/beauty          # newest version; non-zero exit on a checksum mismatch
  FAIR_BUNDLE_SIGNING_KEY=... fair-export sign bundles/beauty --all   # sign versions written unsigned
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_name(text: str) -> str:
    """One plain directory name: the bundle goes to OUT/NAME/VERSION, never elsewhere."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a plain directory name (no '/', not empty, not starting with '.')"
        )
    return text


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-export",
        description="Export a FAIR checkpoint to a verified ONNX bundle BUNDLE_ROOT/NAME/VERSION/ "
        "(manifest.json, model.onnx, semantic_ids.npz, trie.npz, popular.npy). "
        "Use 'fair-export inspect BUNDLE_DIR' to check an existing bundle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="fair-train run directory (best.pt, else checkpoint.pt)")
    src.add_argument("--checkpoint", type=Path, help="a checkpoint file")
    p.add_argument(
        "--sid", type=Path, help="semantic-ID table (default: semantic_ids.npz next to the checkpoint)"
    )
    p.add_argument(
        "--popular", type=Path, help="fallback ranking .npy (default: popular.npy next to the checkpoint)"
    )
    p.add_argument(
        "--data",
        help="the run's data (any fair-data format; checked against the checkpoint's fingerprint): verification samples "
        "real test histories from it, "
        "and fp16/int8 bundles get their own offline Recall/NDCG in the manifest",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle root; the bundle goes to OUT/NAME/VERSION")
    p.add_argument("--name", type=_model_name, default="fair", help="model name (default: fair)")
    p.add_argument(
        "--version", type=_positive_int, help="integer version (default: one more than the newest)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default and minimum: 18)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--quantize", choices=["int8"], help="onnxruntime dynamic int8 quantization")
    prec.add_argument("--fp16", action="store_true", help="float16 weights/activations (float32 I/O)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity checks (not recommended)")
    p.add_argument(
        "--evaluate", action="store_true", help="also record offline metrics for fp32 (needs --data)"
    )
    p.add_argument(
        "--users", type=_positive_int, default=256, help="histories compared in verification (default 256)"
    )
    add_search_arguments(p, default=AUTO, auto=True, intro="how the service ranks with this bundle")
    search = next(a for a in p._actions if a.dest == "search")
    search.help = (  # fair-export's auto is measured (export.search_choice), not the registry's size rule
        f"how the service ranks with this bundle ({'; '.join(f'{m.name}: {m.help}' for m in SEARCH_MODES.values())}; "
        f"auto: exact up to {MEASURE_ABOVE_ITEMS:,} items, else the fastest of exact / ann / beam timed "
        f"at export whose recall@10 of exact is >= {MIN_RECALL10}; default {AUTO}); ann builds a faiss "
        "index into the bundle"
    )
    p.add_argument(
        "--item-encoder",
        action="store_true",
        help="also ship the text encoder the semantic IDs came from (ONNX + tokenizer) and the folded "
        "per-level code tables, so the service can add items without retraining (POST /admin/items); "
        "needs --data (the item texts check it) and a table built by fair-sid build (its quantizer)",
    )
    p.add_argument(
        "--max-abs-diff",
        type=float,
        help="enforce this limit on |scores onnx - torch| for any precision (default: 1e-4, fp32 only)",
    )
    p.add_argument(
        "--min-topk-agreement",
        type=float,
        help="enforce this share of identical top-10 lists for any precision (default: 0.99, fp32 only)",
    )
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-export inspect",
        description="Print a bundle's manifest and check every file's sha256; exit 1 on any problem.",
    )
    p.add_argument("bundle", type=Path, help="BUNDLE_ROOT/NAME (newest version) or BUNDLE_ROOT/NAME/VERSION")
    p.add_argument("--version", type=int, help="pin a version when BUNDLE is a model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object (manifest + problems)")
    return p


def sign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fair-export sign",
        description=f"Sign bundles with the first key of ${signing.KEY_ENV} (manifest.sig), after the "
        "checks a reader makes (regular files nobody else may write, manifest, caps, checksums). For "
        "bundles written before a key was configured: a service with a key serves signed bundles only.",
    )
    p.add_argument("bundle", type=Path, help="BUNDLE_ROOT/NAME (newest version) or BUNDLE_ROOT/NAME/VERSION")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=_positive_int, help="sign this version of BUNDLE_ROOT/NAME")
    which.add_argument("--all", action="store_true", help="sign every version of BUNDLE_ROOT/NAME")
    return p


def _fail(msg: str) -> int:
    print(f"fair-export: error: {msg}", file=sys.stderr)
    return 1


def _env_keys() -> list[bytes]:
    """``FAIR_BUNDLE_SIGNING_KEY``'s keys; a malformed one exits 2 (its value is never printed)."""
    try:
        return signing.keys_from_env()
    except ValueError as exc:
        print(f"fair-export: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def sign_main(argv: list[str]) -> int:
    args = sign_parser().parse_args(argv)
    keys = _env_keys()
    if not keys:
        print(
            f"fair-export sign: error: {signing.KEY_ENV} is not set (the key is read from the environment)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.all:
            if not list_versions(args.bundle):
                return _fail(f"{args.bundle}: no versions to sign (--all takes BUNDLE_ROOT/NAME)")
            paths = [args.bundle / str(v) for v in list_versions(args.bundle)]
        else:
            paths = [resolve_bundle(args.bundle, args.version)]
    except BundleError as exc:
        return _fail(str(exc))
    failed = 0
    for path in paths:
        try:
            sign_bundle(path, keys[0])
        except (BundleError, OSError) as exc:
            failed += 1
            print(f"fair-export sign: {path}: NOT signed: {exc}", file=sys.stderr)
        else:
            print(f"signed {path}")
    return 1 if failed else 0


def inspect_main(argv: list[str]) -> int:
    args = inspect_parser().parse_args(argv)
    keys = _env_keys()
    try:
        path = resolve_bundle(args.bundle, args.version)
        problems = unsafe_entries(path)
        manifest = read_manifest(path)
        problems += verify_checksums(path, manifest)
    except BundleError as exc:
        return _fail(str(exc))
    signed = (path / signing.SIGNATURE_FILE).is_file()
    signature = "unchecked (no key in the environment)" if signed else "none"
    if keys:
        try:
            read_manifest(path, keys)
            signature = "valid"
        except BundleError as exc:
            signature = "INVALID"
            problems.append(f"signature: {exc}")
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "ok": not problems,
                    "problems": problems,
                    "signature": signature,
                    "manifest": manifest,
                }
            )
        )
    else:
        try:  # built in full first: a malformed field gives one error line, not half a summary
            lines = _summary_lines(path, manifest, problems, signature)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            return _fail(f"{path / 'manifest.json'}: malformed field ({type(exc).__name__}: {exc})")
        print("\n".join(lines))
    return 1 if problems else 0


def _summary_lines(path: Path, m: dict, problems: list[str], signature: str = "none") -> list[str]:
    lines: list[str] = []
    add = lines.append
    cfg = m.get("model_config", {})
    add(f"bundle     {path}")
    add(f"model      {m['name']} v{m['version']} ({m['precision']}), created {m['created']}")
    add(
        f"source     {m['source'].get('checkpoint')} (sha256 {str(m['source'].get('checkpoint_sha256'))[:12]}...)"
    )
    add(
        f"network    attention={cfg.get('attention')} layers={cfg.get('n_layers')} d_model={cfg.get('d_model')} "
        f"L={m['code_length']} V={m['codebook_size']} items={m['num_items']} max_history={m['max_history']}"
    )
    for io in m["inputs"]:
        add(f"input      {io['name']}: {io['dtype']} {io['shape']}")
    for io in m["outputs"]:
        add(f"output     {io['name']}: {io['dtype']} {io['shape']}")
    ids = m.get("item_ids") or {}
    add(
        f"search     {mode_from_manifest(m['search']).describe()}"
        + f"   item IDs: dim {ids.get('dim', 0)}, {ids.get('trained_items', 0)} of {m['num_items']} items trained"
    )
    add(f"opset      {m['opset']}   exporter {m['exporter'].get('name')} {m['exporter'].get('version')}")
    encoder = m.get("item_encoder")
    if isinstance(encoder, dict):
        check = encoder.get("check") or {}
        add(
            f"new items  encoder {encoder.get('encoder')} ({encoder.get('embedding_dim')}-d), quantizer "
            f"{encoder.get('quantizer')}: codes reproduced for {check.get('prefix_agreement')} of "
            f"{check.get('items')} catalog items"
        )
    for prec, v in (m.get("verification") or {}).items():
        add(
            f"verified   {prec}: max|diff| {v.get('max_abs_diff'):.3g}, top-10 identical "
            f"{v.get('top10_agreement'):.1%} of {v.get('users')} ({v.get('histories')})"
        )
    for source, values in (m.get("metrics") or {}).items():
        if values:
            add(f"metrics    {source}: {json.dumps(values, sort_keys=True)}")
    for name, digest in sorted(m["files"].items()):
        add(f"file       {name}  {digest[:16]}...")
    add(f"signature  {signature}")
    if problems:
        for line in problems:
            add(f"PROBLEM    {line}")
    else:
        add("checksums  all match")
    return lines


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    # torch and onnx only load for exports: `inspect` stays light
    from export.exporter import ExportFailed, export_bundle, load_sources
    from export.onnx_export import DEFAULT_OPSET

    precision = "int8" if args.quantize == "int8" else "fp16" if args.fp16 else "fp32"
    keys = _env_keys()
    try:
        src = load_sources(args.run, args.checkpoint, args.sid, args.popular, args.data)
        result = export_bundle(
            src,
            args.out,
            name=args.name,
            version=args.version,
            opset=args.opset or DEFAULT_OPSET,
            precision=precision,
            verify=not args.no_verify,
            users=args.users,
            search=args.search,
            search_settings=search_settings(args),
            max_abs_diff=args.max_abs_diff,
            min_topk_agreement=args.min_topk_agreement,
            evaluate=True if args.evaluate else None,
            signing_key=keys[0] if keys else None,
            item_encoder=args.item_encoder,
        )
    except ExportFailed as exc:
        return _fail(str(exc))
    signed = ", signed" if keys else ""
    print(f"wrote {result.path} ({precision}{signed}, {result.seconds:.1f}s)")
    if not keys:
        print(
            f"fair-export: note: {signing.KEY_ENV} is not set: the bundle is unsigned (a service with a "
            "signing key refuses it; docs/operations.md, Security)",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        return inspect_main(argv[1:])
    if argv and argv[0] == "sign":
        return sign_main(argv[1:])
    return export_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
