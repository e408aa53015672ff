"""Checkpoint (or run directory) -> verified, versioned bundle: the work behind ``fair-export``.

Every input is loaded and cross-checked before anything is written, the staging directory is created
next (so an unwritable output fails before the slow export), and the bundle is renamed into place
only after verification passed. Any failure raises ``ExportFailed`` with one line that says what.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export import __version__
from export.bundle import (
    ANN_INDEX_FILE,
    ITEM_ENCODER_KEY,
    ITEM_INPUTS_FILE,
    MODEL_FILE,
    POPULAR_FILE,
    SCHEMA_VERSION,
    SEMANTIC_IDS_FILE,
    TRIE_FILE,
    BundleError,
    BundleStaging,
    list_versions,
    load_popular,
    save_ann_index,
    save_folded,
    save_item_inputs,
    save_trie,
    sha256_file,
    utc_now,
)
from export.fold import fold_item_scores
from export.item_encoder import (
    ItemEncoderExportError,
    check_table,
    describe,
    encoder_dir,
    write_item_encoder,
)
from export.onnx_export import (
    DEFAULT_OPSET,
    ExportError,
    check_exportable,
    check_opset,
    check_schema,
    export_onnx,
    graph_input_names,
    io_spec,
    item_input_table,
)
from export.quantize import convert_fp16, quantize_int8
from export.search_choice import MEASURE_ABOVE_ITEMS, SearchChoice, choose
from export.verify import (
    DEFAULT_USERS,
    TOP_K,
    Search,
    VerificationError,
    check_graph,
    compare,
    offline_metrics,
    onnx_fn,
    ort_session,
    sample_histories,
    scores_for,
    synthetic_histories,
    torch_fn,
    verify_model,
)
from model.data.dataset import DEFAULT_MAX_HISTORY, SequenceDataset
from model.data.loading import load_dataset
from model.evaluate.ranking import item_scorer
from model.fair import FAIR
from model.search.folded import FoldedScorer
from model.search.modes.ann import AnnMode
from model.search.modes.base import SearchConfigError, SearchMode
from model.search.modes.registry import AUTO, choose_mode, manifest_entry
from model.semantic_ids.table import SemanticIdError, SemanticIdTable
from model.semantic_ids.trie import CodeTrie
from model.train.checkpoint import CheckpointError, load_model

RUN_CHECKPOINTS = ("best.pt", "checkpoint.pt")  # preference order inside a run directory
RUN_METRICS = "metrics.json"


def choose_search(
    num_items: int, mode: str = AUTO, settings: Mapping[str, object] | None = None
) -> SearchMode:
    """The search asked for, configured from ``settings`` (``--candidates`` ...) and checked: it must be
    able to return the verification's top 10. For ``auto`` this checks the registry's pick; what is
    served is then measured (``export.search_choice``)."""
    try:
        chosen = choose_mode(mode, num_items, settings)
        chosen.check_k(TOP_K)
    except SearchConfigError as exc:
        raise ExportFailed(f"--search {mode}: {exc} (the verification ranks the top {TOP_K})") from exc
    return chosen


class ExportFailed(RuntimeError):
    """An export that could not produce a bundle; nothing was written."""


@dataclass
class ExportSources:
    """Everything a bundle is made from, loaded and cross-checked."""

    checkpoint_path: Path
    model: FAIR
    checkpoint: dict
    table: SemanticIdTable
    trie: CodeTrie
    popular: np.ndarray
    max_history: int
    run_dir: Path | None = None
    run_metrics: dict = field(default_factory=dict)
    dataset: SequenceDataset | None = None


def _log(msg: str) -> None:
    print(f"fair-export: {msg}", file=sys.stderr, flush=True)


# ---- loading inputs ------------------------------------------------------------------------------------
def _load_table(path: Path) -> SemanticIdTable:
    try:
        return SemanticIdTable.load(path)
    except SemanticIdError as exc:
        raise ExportFailed(str(exc)) from exc


def _max_history(ckpt: dict, ckpt_path: Path) -> int:
    """``train_config.max_history`` (the history length the model was trained on), else the default."""
    train_config = ckpt.get("train_config") or {}
    value = train_config.get("max_history") if isinstance(train_config, dict) else None
    if value is None:
        return DEFAULT_MAX_HISTORY
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportFailed(f"{ckpt_path}: train_config.max_history must be a positive integer, got {value!r}")
    return value


def load_sources(
    run: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    sid: str | os.PathLike | None = None,
    popular: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
) -> ExportSources:
    """Resolve a run directory or a checkpoint (+ table / popularity next to it, or given) and check them."""
    if (run is None) == (checkpoint is None):
        raise ExportFailed("give exactly one of --run RUN_DIR or --checkpoint FILE")
    run_dir = Path(run) if run is not None else None
    if run_dir is not None:
        if not run_dir.is_dir():
            raise ExportFailed(f"{run_dir}: no such run directory")
        found = [run_dir / n for n in RUN_CHECKPOINTS if (run_dir / n).is_file()]
        if not found:
            raise ExportFailed(f"{run_dir}: no {' or '.join(RUN_CHECKPOINTS)} (is it a fair-train run?)")
        ckpt_path = found[0]
    else:
        ckpt_path = Path(checkpoint)  # type: ignore[arg-type]
        if not ckpt_path.is_file():
            raise ExportFailed(f"{ckpt_path}: no such checkpoint")
    home = ckpt_path.parent
    sid_path = Path(sid) if sid is not None else home / SEMANTIC_IDS_FILE
    if not sid_path.is_file():
        raise ExportFailed(f"{sid_path}: no semantic-ID table (pass --sid FILE)")
    table = _load_table(sid_path)

    try:
        model, ckpt = load_model(ckpt_path)
    except CheckpointError as exc:
        raise ExportFailed(str(exc)) from exc
    except (ValueError, TypeError) as exc:  # FAIRConfig.from_dict: unknown keys / invalid values
        raise ExportFailed(f"{ckpt_path}: model config not understood by this exporter: {exc}") from exc
    except RuntimeError as exc:  # load_state_dict: weights of another architecture
        # torch's first line only says "Error(s) in loading state_dict"; the next names the keys
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]
        raise ExportFailed(f"{ckpt_path}: weights do not fit the model config ({detail})") from exc
    try:
        check_exportable(model.cfg)
    except ExportError as exc:
        raise ExportFailed(f"{ckpt_path}: {exc}") from exc

    recorded = ckpt.get("sid_sha256")
    if recorded and recorded != table.sha256():
        raise ExportFailed(
            f"{sid_path}: semantic-ID table does not match the checkpoint (sha256 {table.sha256()[:12]}..., "
            f"{ckpt_path.name} was trained on {str(recorded)[:12]}...)"
        )
    cfg = model.cfg
    if (cfg.num_levels, cfg.codebook_size) != (table.code_length, table.codebook_size):
        raise ExportFailed(
            f"{sid_path}: table has {table.code_length} codes of {table.codebook_size} values, "
            f"the model predicts {cfg.num_levels} of {cfg.codebook_size}"
        )
    trie = CodeTrie.from_codes(table.codes, table.codebook_size)
    max_history = _max_history(ckpt, ckpt_path)

    dataset = None
    if data is not None:
        try:
            dataset = load_dataset(data, max_history=max_history)
            table.check_catalog(dataset.item_ids, what=f"dataset {data}")
        except (OSError, ValueError) as exc:
            raise ExportFailed(str(exc)) from exc
        trained_on = ckpt.get("data_fingerprint")
        if trained_on and trained_on != dataset.fingerprint():
            raise ExportFailed(
                f"{data}: not the data {ckpt_path.name} was trained on (data fingerprint differs)"
            )

    pop_path = Path(popular) if popular is not None else home / POPULAR_FILE
    if pop_path.is_file():
        try:
            pop = load_popular(pop_path, table.num_items)
        except BundleError as exc:
            raise ExportFailed(str(exc)) from exc
    elif dataset is not None:
        pop = np.argsort(-dataset.item_popularity(), kind="stable").astype(np.int64)
    else:
        raise ExportFailed(f"{pop_path}: no popularity ranking (pass --popular FILE or --data DIR)")

    metrics: dict = {}
    if run_dir is not None and (run_dir / RUN_METRICS).is_file():
        try:
            metrics = json.loads((run_dir / RUN_METRICS).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportFailed(f"{run_dir / RUN_METRICS}: not readable JSON ({exc})") from exc
    return ExportSources(ckpt_path, model, ckpt, table, trie, pop, max_history, run_dir, metrics, dataset)


# ---- the export ----------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    manifest: dict
    seconds: float


def _histories(src: ExportSources, users: int) -> tuple[list[np.ndarray], str]:
    if src.dataset is not None:
        split = src.dataset.eval_split("test")
        return sample_histories(split.histories, users), "dataset test split"
    return synthetic_histories(src.table.num_items, src.max_history, users), "synthetic from the table"


def export_bundle(
    src: ExportSources,
    out: str | os.PathLike,
    name: str = "fair",
    version: int | None = None,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    verify: bool = True,
    users: int = DEFAULT_USERS,
    search: str = AUTO,
    search_settings: Mapping[str, object] | None = None,
    max_abs_diff: float | None = None,
    min_topk_agreement: float | None = None,
    evaluate: bool | None = None,
    schema: int = SCHEMA_VERSION,
    signing_key: bytes | None = None,
    item_encoder: bool = False,
) -> ExportResult:
    """Write ``out/name/VERSION`` from ``src``; see the module docstring for the guarantees.

    ``signing_key`` (fair-export: the first key of ``FAIR_BUNDLE_SIGNING_KEY``) signs the manifest
    (``manifest.sig``, ``export.signing``), written with it before the bundle is renamed into place.

    ``max_abs_diff`` / ``min_topk_agreement`` override the limits and then apply to every precision
    (by default they apply to fp32 only). ``evaluate`` (default: for fp16/int8 when ``src`` has a
    dataset) records the bundle's own offline test metrics in the manifest. ``search`` (a registered
    mode or auto) configured by ``search_settings`` (mode parameters by name, e.g. ``candidates``) is
    recorded in the manifest with every setting: how the service ranks with this bundle. ``schema``
    (not a CLI option): 4, or 3 for a bundle of the older layout (graph input ``items``, the ID tables in
    the graph) as bundles exported before schema 4 are, which the service still reads. ``item_encoder``
    (``--item-encoder``) adds the optional files that let the service add items without retraining
    (``export.item_encoder``; needs ``src.dataset`` for the item texts and a schema 4 bundle).
    """
    start = time.perf_counter()
    model_dir = Path(out) / name
    if version is not None and version in list_versions(model_dir):
        raise ExportFailed(
            f"{model_dir / str(version)}: version {version} already exists; versions are immutable"
        )
    if evaluate is None:
        evaluate = precision != "fp32" and src.dataset is not None
    if evaluate and src.dataset is None:
        raise ExportFailed("offline metrics need the run's data: pass --data DIR")
    if item_encoder and src.dataset is None:
        raise ExportFailed(
            "--item-encoder needs the run's data (--data DIR): its item texts check the encoder"
        )
    if item_encoder and schema != 4:
        raise ExportFailed(f"--item-encoder needs a schema 4 bundle, not schema {schema}")
    if item_encoder:
        try:  # before the slow trace: a table without its quantizer or encoder cannot get one
            check_table(src.table)
            encoder_dir(src.table)
        except ItemEncoderExportError as exc:
            raise ExportFailed(f"--item-encoder: {exc}") from exc
    try:
        check_opset(opset)  # before anything is written or traced
        check_schema(schema)
    except ExportError as exc:
        raise ExportFailed(str(exc)) from exc
    mode = choose_search(src.table.num_items, search, search_settings)
    codes = np.asarray(src.table.codes, dtype=np.int64)
    reference = item_scorer(src.model, src.table)  # PyTorch's item score, unfolded: what must be matched
    folded = fold_item_scores(src.model, codes)
    # schema 4, item-ID models: the [I, D] item input vectors the runtime gathers (item_inputs.npy)
    gathered = "item_inputs" in graph_input_names(src.model.cfg, schema)
    item_inputs = item_input_table(src.model) if gathered else None
    histories, origin = _histories(src, users)
    try:
        with (
            BundleStaging(model_dir) as staging,
            tempfile.TemporaryDirectory(prefix=".work-", dir=model_dir) as work,
        ):
            assert staging.path is not None
            # after the staging (an unwritable output fails first): an ann index / auto's timings take
            # a minute at 1M items
            choice = _choose(src, folded, None if search == AUTO else mode, histories, search_settings)
            how = Search(folded, src.trie, choice.mode, reference)
            # the manifest's "search": the mode + every setting (+ the ann index's record, auto's timings)
            entry = manifest_entry(choice.mode, search_settings) | choice.entry
            fp32_path = Path(work) / "model.fp32.onnx"
            _log(f"exporting {src.checkpoint_path} (opset {opset}) ...")
            t0 = time.perf_counter()
            metadata = {"fair.sid_sha256": src.table.sha256()}
            export_onnx(src.model, fp32_path, opset, metadata=metadata, schema=schema)
            export_seconds = time.perf_counter() - t0
            _log(f"exported in {export_seconds:.1f}s")
            verification: dict = {}
            if verify:
                report = verify_model(
                    fp32_path, src.model, src.table, how, histories, src.max_history, "fp32", item_inputs
                )
                _check_limits(report, max_abs_diff, min_topk_agreement)
                verification["fp32"] = report.to_manifest() | {"histories": origin}
                _log(
                    f"fp32 verified: max|diff| {report.max_abs_diff:.2g}, top-10 identical {report.topk_agreement:.1%}"
                )
            final = staging.path / MODEL_FILE
            if precision == "fp32":
                shutil.copyfile(fp32_path, final)
            elif precision == "int8":
                quantize_int8(fp32_path, final)
            elif precision == "fp16":
                convert_fp16(fp32_path, final)
            else:
                raise ExportFailed(f"unknown precision {precision!r}")
            if verify and precision != "fp32":
                cfg = src.model.cfg
                focused = cfg.n_layers if cfg.attention == "focused" else 0
                problems = check_graph(final, focused, cfg.d_model)
                if problems:
                    raise VerificationError(
                        f"{precision} model.onnx: graph check failed: " + "; ".join(problems)
                    )
                report = compare(
                    torch_fn(src.model),
                    onnx_fn(ort_session(final), item_inputs),
                    src.table,
                    how,
                    histories,
                    src.max_history,
                    precision,
                )
                _check_limits(report, max_abs_diff, min_topk_agreement)
                verification[precision] = report.to_manifest() | {"histories": origin}
                _log(
                    f"{precision}: max|diff| {report.max_abs_diff:.2g}, top-10 identical {report.topk_agreement:.1%}"
                )
            metrics: dict = {"run": src.run_metrics}
            if evaluate:
                offline = _offline(src, final, how, entry, item_inputs)
                metrics["bundle"] = offline | {"precision": precision}
            src.table.save(staging.path / SEMANTIC_IDS_FILE)
            save_folded(how.scorer, staging.path)
            if item_inputs is not None:
                save_item_inputs(item_inputs, staging.path / ITEM_INPUTS_FILE)
            save_trie(src.trie, staging.path / TRIE_FILE)
            if choice.index is not None:
                save_ann_index(choice.index, staging.path / ANN_INDEX_FILE)
            np.save(staging.path / POPULAR_FILE, src.popular)
            manifest = _manifest(
                src, name, opset, precision, metrics, verification, export_seconds, how, entry, schema
            )
            if item_encoder:
                assert src.dataset is not None
                _log("exporting the item encoder (text encoder, tokenizer, per-level code tables) ...")
                record = write_item_encoder(
                    src.model, src.table, src.dataset.item_texts(), staging.path, opset
                )
                manifest[ITEM_ENCODER_KEY] = record
                _log(f"item encoder: {describe(record)}")
            path = staging.commit(manifest, version, signing_key)
    except (VerificationError, ExportError, BundleError, ItemEncoderExportError) as exc:
        raise ExportFailed(str(exc)) from exc
    except OSError as exc:
        raise ExportFailed(f"{model_dir}: cannot write the bundle ({exc})") from exc
    manifest = json.loads((path / "manifest.json").read_text())
    return ExportResult(path, manifest, time.perf_counter() - start)


def _choose(
    src: ExportSources,
    folded: FoldedScorer,
    requested: SearchMode | None,
    histories: list[np.ndarray],
    settings: Mapping[str, object] | None,
) -> SearchChoice:
    """The served search (``export.search_choice``): an explicit mode as given (ann: its index built and
    measured), or ``auto`` (None) measured on ``histories`` through the network's ``history``."""
    needs_h = isinstance(requested, AnnMode) or (requested is None and folded.num_items > MEASURE_ABOVE_ITEMS)
    h = np.zeros((0, folded.dim), np.float32)
    if needs_h:
        h = scores_for(torch_fn(src.model), histories, folded.codes, src.max_history)["history"]
    choice = choose(requested, folded, src.trie, h, histories, settings)
    if choice.index is not None:
        info = choice.entry["index"]
        _log(
            f"ann index IVF{info['nlist']}-Flat built in {info['build_seconds']:.1f}s: recall@10 of exact "
            f"{info['recall10']:.3f} at nprobe {info['nprobe']} on {info['recall_users']} histories"
        )
    if "measured" in choice.entry.get("auto", {}):
        _log(f"--search auto: {choice.entry['auto']['chosen']} ({choice.entry['auto']['why']})")
    return choice


def _check_limits(report, max_abs_diff: float | None, min_topk_agreement: float | None) -> None:
    """Explicit limits (CLI overrides) apply to any precision; the defaults were applied in compare()."""
    failures = []
    if max_abs_diff is not None and not report.max_abs_diff <= max_abs_diff:
        failures.append(f"parity: max |history onnx - torch| = {report.max_abs_diff:.3g} > {max_abs_diff:g}")
    if min_topk_agreement is not None and report.topk_agreement < min_topk_agreement:
        failures.append(
            f"top-10: identical for {report.topk_agreement:.2%} of {report.users} users, need >= {min_topk_agreement:.0%}"
        )
    if failures:
        raise VerificationError(f"{report.precision}: " + "; ".join(failures))


def _trained(model: FAIR) -> np.ndarray:
    """[I] bool: items with a trained ID embedding (none for a model without item IDs)."""
    if model.item_emb is None:
        return np.zeros(model.cfg.num_items, dtype=bool)
    return model.item_trained.cpu().numpy().astype(bool)


def _offline(
    src: ExportSources, onnx_path: Path, how: Search, entry: dict, item_inputs: np.ndarray | None
) -> dict:
    assert src.dataset is not None
    split = src.dataset.eval_split("test")
    _log(f"offline metrics on {len(split.targets)} test users ...")
    report = offline_metrics(
        onnx_fn(ort_session(onnx_path), item_inputs),
        src.table,
        how,
        split.histories,
        split.targets,
        src.max_history,
    )
    settings = {key: value for key, value in entry.items() if key != "mode"}
    return {"split": "test", "search": how.mode.name, **settings, **report}


def _manifest(
    src: ExportSources,
    name: str,
    opset: int,
    precision: str,
    metrics: dict,
    verification: dict,
    seconds: float,
    how: Search,
    search_entry: dict,
    schema: int,
) -> dict:
    inputs, outputs = io_spec(src.model.cfg, schema)
    trained = _trained(src.model)
    return {
        "schema_version": schema,
        "name": name,
        "created": utc_now(),
        "precision": precision,
        "source": {
            "checkpoint": str(src.checkpoint_path.resolve()),
            "checkpoint_sha256": sha256_file(src.checkpoint_path),
            "run_dir": str(src.run_dir.resolve()) if src.run_dir else None,
            "step": src.checkpoint.get("step"),
            "data_fingerprint": src.checkpoint.get("data_fingerprint"),
        },
        "model_config": src.model.cfg.to_dict(),
        "code_length": src.table.code_length,
        "codebook_size": src.table.codebook_size,
        "num_items": src.table.num_items,
        "max_history": src.max_history,
        "sid_sha256": src.table.sha256(),
        "catalog_sha256": src.table.catalog_hash,
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "search": search_entry,
        # the folded item score beside the graph: history [D] . item_table[i] + item_bias[i]
        "item_table": {"dim": int(how.scorer.table.shape[1]), "dtype": "float32"},
        "item_ids": {
            "dim": 0
            if how.reference is None or how.reference.vectors is None
            else int(how.reference.vectors.shape[1]),
            "trained_items": int(trained.sum()),
        },
        "metrics": metrics,
        "verification": verification,
        "exporter": {
            "name": "fair-export",
            "version": __version__,
            "torch": torch.__version__,
            "export_seconds": round(seconds, 2),
        },
    }
