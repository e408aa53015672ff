"""The search-mode registry is the one list of modes: a mode registered here (a toy one) becomes a CLI
choice with its own flag, a valid ``train.eval_search``, a manifest ``search`` the bundle reader
accepts, and something ``search`` dispatches to; once unregistered it is refused everywhere again."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from bench.noise_experiment import build_parser as noise_parser
from export.bundle import REQUIRED_KEYS, SCHEMA_VERSION, BundleError, read_manifest
from export.cli import export_parser
from model.evaluate.cli import build_parser as eval_parser
from model.search.item_scores import ItemScorer
from model.search.modes.base import Param, SearchConfigError, SearchMode
from model.search.modes.flags import search_settings
from model.search.modes.registry import (
    get_mode,
    manifest_entry,
    mode_from_manifest,
    mode_names,
    register,
    unregister,
)
from model.search.results import SearchResult
from model.search.scoring import search, top_k
from model.semantic_ids.trie import CodeTrie
from model.train.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class HeadMode(SearchMode):
    """A toy mode: rank only the first ``head_items`` catalog items by the full score."""

    name: ClassVar[str] = "head"
    help: ClassVar[str] = "rank the first head_items catalog items only"
    params: ClassVar[tuple[Param, ...]] = (Param("head_items", 5, 2, "catalog items ranked"),)

    head_items: int = 5

    def search(self, scorer, trie, outputs, k, exclude=None) -> SearchResult:
        items = np.broadcast_to(np.arange(self.head_items), (len(outputs[0]), self.head_items))
        best = top_k(scorer.scores_of(*outputs, items), k)
        return SearchResult(np.where(best.items >= 0, items[0][np.maximum(best.items, 0)], -1), best.scores)


@pytest.fixture
def toy_mode():
    register(HeadMode)
    try:
        yield HeadMode
    finally:
        unregister("head")


def _choices(parser) -> list[str]:
    return next(a.choices for a in parser._actions if a.dest == "search")


def _manifest(search: object) -> dict:
    manifest = {key: {} for key in REQUIRED_KEYS}
    return manifest | {
        "schema_version": SCHEMA_VERSION,
        "name": "m",
        "version": 1,
        "precision": "fp32",
        # the sizes the reader caps (export.bundle.check_limits) must be plausible integers
        "num_items": 100,
        "code_length": 4,
        "codebook_size": 256,
        "max_history": 20,
        "inputs": [],
        "outputs": [],
        "search": search,
    }


def _read(tmp_path: Path, search: object) -> dict:
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(search)))
    return read_manifest(tmp_path)


def test_the_built_in_modes_are_every_list_of_modes():
    assert mode_names() == ("exact", "beam", "ann")
    assert _choices(eval_parser()) == ["exact", "beam", "ann"]
    assert _choices(noise_parser()) == ["exact", "beam", "ann"]
    assert _choices(export_parser()) == ["auto", "exact", "beam", "ann"]


def test_a_registered_mode_is_a_cli_choice_a_config_value_and_a_manifest_mode(toy_mode, tmp_path):
    assert mode_names() == ("exact", "beam", "ann", "head")
    for parser in (eval_parser(), noise_parser(), export_parser()):
        assert "head" in _choices(parser)
    args = export_parser().parse_args(["--run", "r", "--out", "o", "--search", "head", "--head-items", "7"])
    assert (args.search, search_settings(args)) == (
        "head",
        {"candidates": 200, "nprobe": 96, "head_items": 7},
    )
    args = eval_parser().parse_args(["--run", "r", "--data", "d", "--search", "head", "--beam", "30"])
    assert search_settings(args) == {
        "candidates": 30,
        "nprobe": 96,
        "head_items": 5,
    }  # fair-eval keeps --beam
    with pytest.raises(SystemExit):  # the toy parameter's minimum is the flag's
        export_parser().parse_args(["--run", "r", "--out", "o", "--head-items", "1"])

    assert TrainConfig(eval_search="head").eval_search == "head"

    entry = manifest_entry(HeadMode(head_items=4), {"candidates": 50})
    assert entry == {"mode": "head", "candidates": 50, "nprobe": 96, "head_items": 4}
    assert mode_from_manifest(_read(tmp_path, entry)["search"]) == HeadMode(head_items=4)
    with pytest.raises(BundleError, match="field 'search'.*head_items"):
        _read(tmp_path, {"mode": "head", "candidates": 50})  # a mode's own parameter is required
    with pytest.raises(BundleError, match="field 'search'.*head_items must be an integer >= 2"):
        _read(tmp_path, {"mode": "head", "head_items": 1})

    rng = np.random.default_rng(0)
    flat = rng.choice(16, 20 - 4, replace=False)
    codes = np.stack([flat // 4, flat % 4], axis=1)
    scorer = ItemScorer(codes, rng.standard_normal((16, 3)).astype(np.float32), np.zeros(16, np.float32))
    cs, q = rng.standard_normal((2, 2, 4)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    got = search(scorer, CodeTrie.from_codes(codes, 4), cs, q, 3, "head", head_items=6)
    assert np.isin(got.items, np.arange(6)).all()
    np.testing.assert_array_equal(got.items, HeadMode(6).search(scorer, None, (cs, q), 3).items)


def test_an_unregistered_mode_is_refused_everywhere(tmp_path):
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--run", "r", "--data", "d", "--search", "head"])
    with pytest.raises(SystemExit):
        export_parser().parse_args(["--run", "r", "--out", "o", "--search", "head"])
    with pytest.raises(ConfigError, match=r"train.eval_search must be one of \['exact', 'beam', 'ann'\]"):
        TrainConfig(eval_search="head")
    with pytest.raises(BundleError, match="field 'search'.*one of"):
        _read(tmp_path, {"mode": "head", "head_items": 5})
    with pytest.raises(ValueError, match="search mode must be one of"):
        get_mode("head")


def test_the_manifest_format_is_unchanged_for_the_built_in_modes(tmp_path):
    exact = mode_from_manifest(_read(tmp_path, {"mode": "exact", "candidates": 200})["search"])
    beam = mode_from_manifest(_read(tmp_path, {"mode": "beam", "candidates": 37})["search"])
    # written with every registered parameter (ann's nprobe too); read without the ones it lacks
    assert manifest_entry(exact, {"candidates": 200}) == {"mode": "exact", "candidates": 200, "nprobe": 96}
    assert manifest_entry(beam) == {"mode": "beam", "candidates": 37, "nprobe": 96}
    assert (exact.describe(), beam.describe()) == ("exact", "beam 37")
    for bad in ({"mode": "beam"}, {"mode": "beam", "candidates": True}, {"mode": "exact", "candidates": 0}):
        with pytest.raises(BundleError, match="field 'search'"):
            _read(tmp_path, bad)


def test_a_mode_must_declare_its_fields_as_params_and_take_a_free_name():
    @dataclass(frozen=True)
    class Undeclared(SearchMode):
        name: ClassVar[str] = "undeclared"
        help: ClassVar[str] = ""
        width: int = 3  # a field that is not a declared parameter

        def search(self, scorer, trie, outputs, k, exclude=None):
            raise AssertionError

    with pytest.raises(SearchConfigError, match="fields must be its params"):
        register(Undeclared)
    with pytest.raises(SearchConfigError, match="already registered"):
        register(get_mode("exact"))
    assert mode_names() == ("exact", "beam", "ann")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_search_modules_import_each_other_without_a_cycle():
    """One served search flows mode -> kernels, never back: the import graph of model/search is a DAG
    (the beam kernel imports neither the scoring kernels nor any mode)."""
    root = REPO / "model" / "search"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    graph["model.search"] = set()  # the package's __init__ gathers everything; nothing imports it
    assert not graph["model.search.beam"] & {"model.search.scoring", "model.search.modes.beam"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in graph[module]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
