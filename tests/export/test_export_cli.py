"""fair-export end to end on a tiny model: parity, graph shape, inspect, int8, failures, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_export import TINY_CONFIG, TINY_MAX_HISTORY, build_tiny_run, tiny_table, write_tiny_data

from export.bundle import load_bundle
from export.cli import main
from export.onnx_export import FOCUSED_ATTENTION, attention_units, next_item_history
from export.quantize import convert_fp16
from export.verify import check_graph
from model.data.loading import load_dataset
from model.evaluate.ranking import item_scorer
from model.search.inputs import CODE_INPUTS, ITEM_VECTOR_INPUTS, graph_feeds, histories_to_inputs
from model.search.modes.registry import make_mode
from model.train.checkpoint import load_model


def _torch_history(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return next_item_history(model, *(torch.from_numpy(a) for a in inputs)).numpy()


def _run_graph(session, bundle, inputs) -> np.ndarray:
    """The graph's history for ``inputs``, fed as the service feeds it (item_inputs gathered)."""
    names = [i.name for i in session.get_inputs()]
    return session.run(None, graph_feeds(inputs, names, bundle.item_inputs))[0]


def test_bundle_matches_pytorch_on_varied_histories(tiny_bundle, tiny_run):
    """The graph outputs PyTorch's history, and the bundle's folded table turns it into PyTorch's item
    scores (``FAIR.item_logits``) and PyTorch's ranking."""
    bundle = load_bundle(tiny_bundle)
    model, _ = load_model(tiny_run / "best.pt")
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    reference = item_scorer(model, bundle.table)
    exact = make_mode("exact")
    rng = np.random.default_rng(1)
    # several batch sizes and history lengths, including ones longer than the model's position table
    for batch, longest in [(1, 1), (5, 3), (17, 12)]:
        histories = [
            rng.choice(bundle.table.num_items, size=int(rng.integers(1, longest + 1))) for _ in range(batch)
        ]
        inputs = histories_to_inputs(histories, bundle.table.codes, max_history=longest)
        got = _run_graph(session, bundle, inputs)
        want = _torch_history(model, inputs)
        assert got.shape == (batch, TINY_CONFIG["d_model"])
        assert np.abs(got - want).max() <= 1e-4
        with torch.no_grad():
            unfolded = [t.numpy() for t in model.next_item_scores(*(torch.from_numpy(a) for a in inputs))]
            logits = model.item_logits(torch.from_numpy(want), torch.from_numpy(bundle.table.codes)).numpy()
        top_got = exact.search(bundle.scorer, bundle.trie, (got,), 10, histories).items
        top_want = exact.search(reference, bundle.trie, tuple(unfolded), 10, histories).items
        assert (top_got == top_want).all(axis=1).mean() >= 0.99
        # the bundle's folded table is the model's item score: same scores as the PyTorch item logits
        np.testing.assert_allclose(bundle.scorer.all_scores(got), logits, atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(bundle.scorer.code_part(got), unfolded[0], atol=1e-3, rtol=1e-4)
    assert bundle.manifest["item_ids"]["trained_items"] == TINY_CONFIG["num_items"] - 18
    assert bundle.manifest["item_table"] == {"dim": TINY_CONFIG["d_model"], "dtype": "float32"}
    assert bundle.manifest["search"] == {
        "mode": "exact",
        "candidates": 200,
        "nprobe": 96,
        "auto": {
            "chosen": "exact",
            "why": "a catalog of 120 items (<= 20,000) is served exact, not measured",
        },
    }
    assert bundle.schema_version == 4 and bundle.output_names == ("history",)
    assert bundle.input_names == ITEM_VECTOR_INPUTS and bundle.item_inputs is not None
    with torch.no_grad():  # the shipped item inputs are the network's ID input vectors (cold rows: 0)
        np.testing.assert_allclose(bundle.item_inputs, model.id_vectors().numpy(), rtol=1e-6, atol=1e-7)
    assert not bundle.item_inputs[~model.item_trained.numpy()].any()

    v = bundle.manifest["verification"]["fp32"]
    assert v["users"] == 256 and v["max_abs_diff"] <= 1e-4 and v["top10_agreement"] >= 0.99
    assert "against pytorch's item score" in v["checks"][-1]
    assert bundle.manifest["metrics"]["run"]["test"]["recall@10"] == 0.5  # the run's metrics.json


def test_a_text_model_exports_its_text_part_for_every_item_cold_ones_included(tmp_path):
    """model.item_text: the folded table holds ID rows + projected text, so an item without a trained
    ID row still has its text part in the served score; the graph reads the text on input."""
    run = build_tiny_run(tmp_path / "run", item_text=True, text_dim=8)
    assert main(["--run", str(run), "--out", str(tmp_path / "b"), "--name", "t"]) == 0
    bundle = load_bundle(tmp_path / "b" / "t" / "1")
    model, _ = load_model(run / "best.pt")
    cold = ~model.item_trained.numpy()
    assert cold.any()
    with torch.no_grad():
        h = torch.randn(3, TINY_CONFIG["d_model"], generator=torch.Generator().manual_seed(0))
        codes = torch.from_numpy(bundle.table.codes)
        logits = model.item_logits(h, codes).numpy()
        model.item_text.zero_()
        without_text = model.item_logits(h, codes).numpy()
        model.item_text.copy_(load_model(run / "best.pt")[0].item_text)
    scores = bundle.scorer.all_scores(h.numpy())
    np.testing.assert_allclose(scores, logits, atol=1e-4, rtol=1e-4)
    assert np.abs(scores[:, cold] - without_text[:, cold]).max() > 1e-3  # cold items keep their text
    v = bundle.manifest["verification"]["fp32"]
    assert v["max_abs_diff"] <= 1e-4 and v["top10_agreement"] >= 0.99
    # a history of cold items only: the graph and PyTorch agree, and the text changes the answer
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    inputs = histories_to_inputs([np.flatnonzero(cold)[:4]], bundle.table.codes, max_history=6)
    got = _run_graph(session, bundle, inputs)
    want = _torch_history(model, inputs)
    with torch.no_grad():
        model.item_text.zero_()
    blank = _torch_history(model, inputs)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want - blank).max() > 1e-3


def test_a_model_without_item_ids_exports_a_graph_of_codes_and_mask_alone(tmp_path):
    """Schema 4 without item IDs: no item_inputs input and no item_inputs.npy; still PyTorch's ranking."""
    run = build_tiny_run(tmp_path / "run", item_ids=False)
    assert main(["--run", str(run), "--out", str(tmp_path / "b"), "--name", "c", "--users", "32"]) == 0
    bundle = load_bundle(tmp_path / "b" / "c" / "1")
    assert bundle.schema_version == 4 and bundle.input_names == CODE_INPUTS and bundle.item_inputs is None
    assert [i["name"] for i in bundle.manifest["inputs"]] == list(CODE_INPUTS)
    assert "item_inputs.npy" not in bundle.manifest["files"] and not (bundle.dir / "item_inputs.npy").exists()
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(CODE_INPUTS)
    model, _ = load_model(run / "best.pt")
    inputs = histories_to_inputs([[1, 2, 3], [4]], bundle.table.codes, 6)
    assert np.abs(_run_graph(session, bundle, inputs) - _torch_history(model, inputs)).max() <= 1e-4
    assert bundle.manifest["verification"]["fp32"]["top10_agreement"] >= 0.99


def test_manifest_describes_the_graph(tiny_bundle):
    manifest = load_bundle(tiny_bundle).manifest
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    assert (
        [i.name for i in proto.graph.input]
        == [i["name"] for i in manifest["inputs"]]
        == ["codes", "item_inputs", "item_mask"]
    )
    assert [o.name for o in proto.graph.output] == [o["name"] for o in manifest["outputs"]]
    assert [o.name for o in proto.graph.output] == ["history"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    d = TINY_CONFIG["d_model"]
    assert dims == [["batch", "items", 3], ["batch", "items", d], ["batch", "items"]]
    assert [i["dtype"] for i in manifest["inputs"]] == ["int64", "float32", "bool"]
    assert manifest["schema_version"] == 4 and "item_inputs.npy" in manifest["files"]
    assert manifest["opset"] == 18 and manifest["precision"] == "fp32"
    assert manifest["model_config"]["n_layers"] == TINY_CONFIG["n_layers"]


def test_focused_attention_is_a_named_unit_per_layer(tiny_bundle):
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    units = attention_units(proto, FOCUSED_ATTENTION)
    assert sorted(units) == [f"blocks.{i}:Block/attn" for i in range(TINY_CONFIG["n_layers"])]
    for nodes in units.values():
        ops = [n.op_type for n in nodes]
        # two attention maps per head (the differential form), their difference, and the head norm
        assert ops.count("Softmax") == 2 and "Sub" in ops
        assert any("head_norm:RMSNorm" in n.name for n in nodes)
    assert not any(n.op_type == "Softmax" and FOCUSED_ATTENTION not in n.name for n in proto.graph.node)


def test_inspect_passes_then_detects_a_flipped_byte(tiny_bundle, tmp_path, capsys):
    assert main(["inspect", str(tiny_bundle.parent)]) == 0  # the model directory: newest version
    assert "checksums  all match" in capsys.readouterr().out
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert main(["inspect", str(copy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"][0].startswith("model.onnx: sha256")
    assert report["manifest"]["version"] == 1


def test_int8_export_runs_and_records_its_own_offline_metrics(tiny_run, tiny_bundle, tmp_path):
    data = write_tiny_data(tmp_path / "data", tiny_table())
    out = tmp_path / "bundles"
    assert main(["--run", str(tiny_run), "--data", str(data), "--out", str(out), "--quantize", "int8"]) == 0
    bundle = load_bundle(out / "fair")
    assert bundle.version == 1 and bundle.precision == "int8"
    # every weight MatMul is quantized: int8 weights, integer MatMuls, no float MatMul on a constant left
    graph = onnx.load(str(bundle.model_path)).graph
    ops = [n.op_type for n in graph.node]
    constants = {t.name: t for t in graph.initializer}
    float_weight_matmuls = [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm")
        and any(i in constants and constants[i].data_type == onnx.TensorProto.FLOAT for i in n.input)
    ]
    assert float_weight_matmuls == []
    assert ops.count("MatMulInteger") >= TINY_CONFIG["n_layers"] and "DynamicQuantizeLinear" in ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    verification = bundle.manifest["verification"]
    assert verification["fp32"]["max_abs_diff"] <= 1e-4  # the fp32 graph it came from passed the gates
    assert verification["fp32"]["histories"] == "dataset test split"
    int8 = verification["int8"]
    assert 1e-4 < int8["max_abs_diff"] < 1.0  # measured, not enforced: int8 is not fp32 in disguise
    assert int8["max_abs_diff_limit"] is None and int8["histories"] == "dataset test split"

    # The recorded offline metrics are the int8 graph's own: recomputed here from the graph's output on
    # the test split (all 60 users in one batch, as fair-export ranks them: int8's activation scales
    # are per batch), the served exact search, and the leave-one-out definition written out by hand.
    offline = bundle.manifest["metrics"]["bundle"]
    assert offline["precision"] == "int8" and offline["users"] == 60 and offline["invalid_rate"] == 0.0
    split = load_dataset(data, max_history=TINY_MAX_HISTORY).eval_split("test")
    histories = [np.asarray(h, dtype=np.int64) for h in split.histories]
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    h = _run_graph(session, bundle, histories_to_inputs(histories, bundle.table.codes, TINY_MAX_HISTORY))
    ranked = make_mode("exact").search(bundle.scorer, bundle.trie, (h,), 10, histories).items
    for k in (5, 10):
        ranks = [
            list(row[:k]).index(t) if t in row[:k] else None
            for row, t in zip(ranked, split.targets, strict=True)
        ]
        assert offline[f"recall@{k}"] == pytest.approx(np.mean([r is not None for r in ranks]), abs=1e-12)
        ndcg = np.mean([0.0 if r is None else 1 / np.log2(r + 2) for r in ranks])
        assert offline[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
    assert offline["recall@10"] > 0  # some targets found: the comparison above compared real rankings
    # and the int8 graph is the fp32 one, up to quantization: close, not identical
    fp32 = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = histories_to_inputs([[1, 2, 3], [4]], bundle.table.codes, 6)
    diff = np.abs(_run_graph(session, bundle, inputs) - _run_graph(fp32, load_bundle(tiny_bundle), inputs))
    assert 1e-4 < diff.max() <= 2 * int8["max_abs_diff"]


def test_failed_verification_writes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "bundles"
    # fp32 reaches ~1e-6, int8 cannot reach 1e-5: the explicit limit makes the int8 check fail
    rc = main(["--run", str(tiny_run), "--out", str(out), "--quantize", "int8", "--max-abs-diff", "1e-5"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: int8: parity: max |history onnx - torch|" in err and "> 1e-05" in err
    assert not out.exists()


def _checkpoint_dict(run):
    return torch.load(run / "best.pt", weights_only=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "no such checkpoint"),
        ("corrupt", "not a readable checkpoint"),
        ("unknown_config", "model config not understood by this exporter"),
        ("user_token", "hashed user token"),
        ("other_table", "semantic-ID table does not match the checkpoint"),
        ("unwritable", "cannot write a bundle here"),
        ("existing_version", "version 1 already exists"),
        ("other_data", "not the data best.pt was trained on"),
        ("low_opset", "opset 17 is not supported"),
        ("missing_weights", "weights do not fit the model config (Missing key(s) in state_dict: "),
        ("bad_max_history", "train_config.max_history must be a positive integer, got 'abc'"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, damage, message):
    run = build_tiny_run(tmp_path / "run", **({"user_buckets": 4} if damage == "user_token" else {}))
    ckpt = run / "best.pt"
    out = tmp_path / "bundles"
    args = ["--checkpoint", str(ckpt), "--out", str(out)]
    if damage == "missing":
        args[1] = str(run / "nope.pt")
    elif damage == "corrupt":
        ckpt.write_bytes(b"\x00garbage" * 10)
    elif damage == "unknown_config":
        d = _checkpoint_dict(run)
        d["model_config"]["focus_temperature"] = 2.0
        torch.save(d, ckpt)
    elif damage == "other_table":
        tiny_table(seed=9).save(run / "semantic_ids.npz")
    elif damage == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "bundles"
        args[-1] = str(out)
    elif damage == "other_data":
        d = _checkpoint_dict(run)
        d["data_fingerprint"] = "0" * 64
        torch.save(d, ckpt)
        args += ["--data", str(write_tiny_data(tmp_path / "data", tiny_table()))]
    elif damage == "missing_weights":
        d = _checkpoint_dict(run)
        d["model"] = dict(list(d["model"].items())[:3])
        torch.save(d, ckpt)
    elif damage == "bad_max_history":
        d = _checkpoint_dict(run)
        d["train_config"] = {"max_history": "abc"}
        torch.save(d, ckpt)
    elif damage == "low_opset":  # the exporter would keep 18 and the manifest would say 17
        args += ["--opset", "17"]
    elif damage == "existing_version":
        (out / "fair" / "1").mkdir(parents=True)
        args += ["--version", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fair-export: error:") and message in err[0]
    if damage == "existing_version":
        assert sorted(p.name for p in (out / "fair").iterdir()) == ["1"]
    else:
        assert not out.exists()


def test_fp16_conversion_keeps_the_io_contract(tiny_bundle, tmp_path):
    half = convert_fp16(tiny_bundle / "model.onnx", tmp_path / "model.fp16.onnx")
    cfg = TINY_CONFIG
    assert check_graph(half, cfg["n_layers"], cfg["d_model"]) == []
    bundle = load_bundle(tiny_bundle)
    inputs = histories_to_inputs([[5, 6, 7], [8]], bundle.table.codes, 6)
    feeds = graph_feeds(inputs, ITEM_VECTOR_INPUTS, bundle.item_inputs)
    (fp16_out,) = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"]).run(None, feeds)
    (fp32_out,) = ort.InferenceSession(
        str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    assert fp16_out.dtype == np.float32 and fp16_out.shape == fp32_out.shape
    assert 0 < np.abs(fp16_out - fp32_out).max() < 0.05


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--users", "0"], "--users: must be a positive integer, got 0"),
        (["--candidates", "-3"], "--candidates: must be a positive integer, got -3"),
        (["--version", "0"], "--version: must be a positive integer, got 0"),
        (["--name", "../elsewhere"], "--name: '../elsewhere': must be a plain directory name"),
        (["--name", ""], "--name: '': must be a plain directory name"),
    ],
)
def test_bad_arguments_are_a_usage_error_before_anything_runs(tiny_run, tmp_path, capsys, extra, message):
    out = tmp_path / "bundles"
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tiny_run), "--out", str(out), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "elsewhere").exists()


def test_data_takes_a_synthetic_spec_like_every_data_flag(tiny_run, tmp_path, capsys):
    out = tmp_path / "bundles"
    args = ["--run", str(tiny_run), "--out", str(out), "--data", "synthetic:items=30,users=20,seed=1"]
    assert main(args) == 1  # the spec is loaded (not taken for a missing folder), then refused: other catalog
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "semantic-ID table does not match the dataset synthetic:items=30" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "field, value", [("source", "a string"), ("inputs", [1]), ("verification", {"fp32": {}})]
)
def test_inspect_reports_a_malformed_manifest_field_in_one_line(tiny_bundle, tmp_path, capsys, field, value):
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    assert main(["inspect", str(copy)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert err[0].startswith(f"fair-export: error: {copy / 'manifest.json'}: malformed field")
