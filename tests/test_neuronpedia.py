"""Neuronpedia export (files checked against the field lists in docs/formats.md), upload against a local
HTTP server, labels (CLI, file, and automatic ones from a fake OpenAI-compatible endpoint)."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from nanosae.cli import main
from nanosae.data import token_rows
from nanosae.errors import NanosaeError
from nanosae.features import FeatureConfig, FeatureStats, compute_features
from nanosae.labels import auto_label, load_label_records, load_labels, set_label
from nanosae.neuronpedia import check_upload_body, export_neuronpedia, names, upload, upload_plan
from nanosae.sae import SAE, SAEConfig, load_sae

BASE = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
D = 300  # three batches of up to 128

# SAEDashboard's Neuronpedia runner: the batch file and its feature records, field names exact
BATCH_KEYS = ["model_id", "layer", "sae_set", "sae_id_suffix", "features"]
FEATURE_KEYS = [
    "feature_index",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_pearson",
    "correlated_neurons_l1",
    "correlated_features_indices",
    "correlated_features_pearson",
    "correlated_features_l1",
    "pos_str",
    "pos_values",
    "neg_str",
    "neg_values",
    "frac_nonzero",
    "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "logits_hist_data_bar_heights",
    "n_prompts_total",
    "n_tokens_in_prompt",
    "dataset",
    "decoder_weights_dist",
    "vector",
    "activations",
]
ACTIVATION_KEYS = ["bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"]
SKIPPED_KEYS = ["model_id", "layer", "sae_set", "log_sparsity", "skipped_indexes"]
# neuronpedia-utils' converter: the bulk-import records
RELEASE_KEYS = [
    "name",
    "description",
    "descriptionShort",
    "urls",
    "creatorName",
    "creatorNameShort",
    "creatorId",
    "createdAt",
]
MODEL_KEYS = ["id", "instruct", "displayName", "displayNameShort", "creatorId", "createdAt", "updatedAt"]
SOURCESET_KEYS = ["modelId", "name", "description", "creatorName", "releaseName", "visibility"]
SOURCE_KEYS = ["id", "modelId", "setName", "dataset", "num_prompts", "num_tokens_in_prompt", "hfRepoId", "hfFolderId"]
FEATURE_LINE_KEYS = [
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector", "vectorLabel",
    "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues", "sourceSetName",
] + [k for k in FEATURE_KEYS if k.startswith(("neuron_", "correlated_", "pos_", "neg_", "freq_", "logits_"))] + [
    "frac_nonzero", "decoder_weights_dist",
]  # fmt: skip
ACTIVATION_LINE_KEYS = [
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId",
    "binMin", "binMax", "binContains", "qualifyingTokenIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue",
    "lossValues", "logitContributions", "dataSource", "dataIndex", "createdAt",
]  # fmt: skip
EXPLANATION_KEYS = [
    "id", "modelId", "layer", "index", "description", "authorId", "typeName", "explanationModelName", "embedding",
    "triggeredById", "notes", "createdAt",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(d4, tmp_path_factory):
    """(stats, sae, sae_dir, export_dir): a hand-made SAE with a few latents that never fire, exported."""
    model, tok, _ = d4
    g = torch.Generator().manual_seed(7)
    sae = SAE(SAEConfig(architecture="standard", d_in=128, d_sae=D, hook_name="blocks.2.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, D, generator=g) / 128**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.copy_(-1.5 - torch.rand(D, generator=g))
        sae.b_enc[:5] = -1e4  # dead latents, skipped by the export
    sae_dir = tmp_path_factory.mktemp("sae")
    sae.save(sae_dir)
    rows = [r for r, _ in zip(token_rows(tok, None, 64), range(16))]
    batches = [torch.tensor(rows[i : i + 8]) for i in range(0, 16, 8)]
    stats = compute_features(model, tok, sae, batches, FeatureConfig(n_tokens=1024, seq_len=64), progress=False)
    human, auto = [i for i in range(D) if stats.a("density")[i] > 0][:2]
    set_label(sae_dir, human, "closing brackets")
    set_label(sae_dir, auto, "numbers", model="fake-llm")
    set_label(sae_dir, 0, "a dead latent's label is not exported")
    stats.labelled = human, auto
    out = tmp_path_factory.mktemp("export")
    export_neuronpedia(
        stats, sae, out, load_label_records(sae_dir), created_at="2025-01-01T00:00:00.000Z", progress=False
    )
    return stats, sae, sae_dir, out


def read_gz(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]


def test_names_follow_neuronpedia(setup):
    stats = setup[0]
    n = names(stats)
    assert f"{n['model_id']}/{n['source']}" == "nanochat-d4/2-res-nanosae"
    assert n["hook_name"] == "blocks.2.hook_resid_post"
    d20 = FeatureStats({**stats.meta, "site": "blocks.10.resid_post", "model_name": "nanochat-d20"}, {}, [])
    assert names(d20)["source"] == "10-res-nanosae" and names(d20)["model_id"] == "nanochat-d20"
    mlp = FeatureStats({**stats.meta, "site": "blocks.3.mlp_out"}, {}, [])
    assert names(mlp, set_name="mlp-x")["source"] == "3-mlp-x" and names(mlp)["set_name"] == "mlp-nanosae"
    with pytest.raises(NanosaeError, match="model id"):
        names(stats, model_id="bad id/with slash")


def test_saelens_weights(setup):
    stats, sae, _, out = setup
    back = load_sae(out / "saelens")
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    cfg = json.loads((out / "saelens" / "cfg.json").read_text())
    assert cfg["metadata"]["neuronpedia_id"] == "nanochat-d4/2-res-nanosae"
    from safetensors.torch import load_file

    sp = load_file(out / "saelens" / "sparsity.safetensors")["sparsity"]
    assert torch.allclose(sp, torch.log10(stats.t["density"].float().clamp(min=1e-10)))


def test_dashboard_batches_have_every_field(setup):
    stats, _, _, out = setup
    dash = out / "dashboard" / "nanochat-d4_res-nanosae_blocks.2.hook_resid_post_300"
    skipped = json.loads((dash / "skipped_indexes.json").read_text())
    assert list(skipped) == SKIPPED_KEYS
    dead = [i for i in range(D) if stats.a("density")[i] == 0]
    assert skipped["skipped_indexes"] == dead and set(range(5)) <= set(dead)
    settings = json.loads((dash / "run_settings.json").read_text())
    assert settings["model_id"] == "nanochat-d4" and settings["n_features_at_a_time"] == 128
    files = sorted(dash.glob("batch-*.json"))
    assert len(files) == math.ceil((D - len(dead)) / 128)
    seen = []
    for f in files:
        batch = json.loads(f.read_text())
        assert list(batch) == BATCH_KEYS
        assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (
            "nanochat-d4",
            2,
            "res-nanosae",
            None,
        )
        assert 1 <= len(batch["features"]) <= 128
        for feat in batch["features"]:
            assert list(feat) == FEATURE_KEYS
            i = feat["feature_index"]
            seen.append(i)
            assert feat["frac_nonzero"] == pytest.approx(float(stats.a("density")[i]))
            assert len(feat["pos_str"]) == len(feat["pos_values"]) == 10 == len(feat["neg_str"])
            assert feat["pos_values"] == sorted(feat["pos_values"], reverse=True)
            assert feat["pos_str"][0] == stats.vocab[int(stats.a("pos_idx")[i, 0])]
            assert len(feat["freq_hist_data_bar_values"]) == len(feat["freq_hist_data_bar_heights"]) == 50
            assert len(feat["logits_hist_data_bar_heights"]) == 50 and sum(feat["logits_hist_data_bar_heights"]) == 2000
            assert len(feat["neuron_alignment_indices"]) == len(feat["neuron_alignment_l1"]) == 3
            assert all(j // 128 == i // 128 and j != i for j in feat["correlated_features_indices"])
            assert feat["n_tokens_in_prompt"] == 64 and feat["n_prompts_total"] == 16
            acts = feat["activations"]
            top = [a for a in acts if a["bin_contains"] == -1]
            assert top and acts[: len(top)] == top  # the top group first
            for a in acts:
                assert list(a) == ACTIVATION_KEYS
                assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
                assert 0 <= a["qualifying_token_index"] < len(a["tokens"])
                v = a["values"][a["qualifying_token_index"]]
                if a["bin_contains"] == -1:
                    assert a["bin_min"] == -1 and a["bin_max"] == pytest.approx(float(stats.a("max")[i]), rel=1e-3)
                else:
                    assert 0 <= a["bin_contains"] <= 1
                    assert a["bin_min"] - 2e-3 <= v <= a["bin_max"] + 2e-3
            assert top[0]["values"][top[0]["qualifying_token_index"]] == pytest.approx(
                float(stats.a("max")[i]), abs=2e-3
            )
    assert seen == [i for i in range(D) if i not in dead]


def test_bulk_import_layout(setup):
    stats, _, _, out = setup
    exp = out / "exports" / "nanochat-d4" / "2-res-nanosae"
    for name, keys in (
        ("release", RELEASE_KEYS),
        ("model", MODEL_KEYS),
        ("sourceset", SOURCESET_KEYS),
        ("source", SOURCE_KEYS),
    ):
        lines = (exp / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1 and set(keys) <= set(json.loads(lines[0])), name
    assert json.loads((exp / "source.jsonl").read_text())["id"] == "2-res-nanosae"
    feats = [r for p in sorted((exp / "features").glob("batch-*.jsonl.gz")) for r in read_gz(p)]
    acts = [r for p in sorted((exp / "activations").glob("batch-*.jsonl.gz")) for r in read_gz(p)]
    alive = [i for i in range(D) if stats.a("density")[i] > 0]
    assert [int(f["index"]) for f in feats] == alive
    for f in feats:
        assert set(FEATURE_LINE_KEYS) <= set(f)
        assert (f["modelId"], f["layer"], f["sourceSetName"], f["hookName"]) == (
            "nanochat-d4",
            "2-res-nanosae",
            "res-nanosae",
            "blocks.2.hook_resid_post",
        )
        i = int(f["index"])
        assert f["maxActApprox"] == pytest.approx(float(stats.a("max")[i]), abs=1e-3)
        assert f["topkCosSimIndices"] == stats.a("nb_idx")[i].tolist()
    assert acts and all(list(a) == ACTIVATION_LINE_KEYS for a in acts)
    assert len({a["id"] for a in acts}) == len(acts)
    for a in acts[:50]:
        assert a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    expl = [r for p in sorted((exp / "explanations").glob("batch-*.jsonl.gz")) for r in read_gz(p)]
    human, auto = stats.labelled
    assert {(e["index"], e["description"], e["typeName"], e["explanationModelName"]) for e in expl} == {
        (str(human), "closing brackets", "human", None),
        (str(auto), "numbers", "nanosae-auto", "fake-llm"),
    }
    assert all(list(e) == EXPLANATION_KEYS for e in expl)
    # the same statistics export to the same bytes
    again = out.parent / (out.name + "-again")
    export_neuronpedia(
        stats, setup[1], again, load_label_records(setup[2]), created_at="2025-01-01T00:00:00.000Z", progress=False
    )
    for p in exp.rglob("*.gz"):
        assert (again / p.relative_to(out)).read_bytes() == p.read_bytes()
    shutil.rmtree(again)


class Recorder:
    """A local HTTP server that records POSTs and answers with a fixed status and JSON body."""

    def __init__(self, status: int = 200, reply: dict | None = None):
        self.requests: list[tuple[str, dict, dict]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                rec.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                data = json.dumps(reply or {"ok": True}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_upload_posts_batches_to_the_api(setup):
    stats, _, _, out = setup
    srv = Recorder()
    try:
        logged = []
        n = upload(out, srv.url, "secret-key", send=False, log=logged.append)
        assert srv.requests == [] and n >= 2  # dry run by default: nothing sent
        assert any("would POST" in line and "/api/feature/upload-batch" in line for line in logged)
        assert "dry run" in logged[-1]
        with pytest.raises(NanosaeError, match="API key"):
            upload(out, srv.url, None, send=True, log=logged.append)
        upload(out, srv.url + "/", "secret-key", send=True, log=logged.append)
    finally:
        srv.close()
    paths = [p for p, _, _ in srv.requests]
    assert paths[0] == "/api/source-set/new" and set(paths[1:]) == {"/api/feature/upload-batch"}
    assert srv.requests[0][2] == {
        "name": "res-nanosae",
        "modelId": "nanochat-d4",
        "description": srv.requests[0][2]["description"],
        "url": None,
    }
    sent = []
    for _, headers, _ in srv.requests:
        assert headers["x-api-key"] == "secret-key" and headers["content-type"] == "application/json"
    for _, _, body in srv.requests[1:]:
        check_upload_body(body)
        assert body["modelId"] == "nanochat-d4" and body["source"] == "2-res-nanosae"
        assert len(body["features"]) <= 128
        sent += body["features"]
    alive = [i for i in range(D) if stats.a("density")[i] > 0]
    assert [f["index"] for f in sent] == alive
    by = {f["index"]: f for f in sent}
    human, auto = stats.labelled
    assert by[human]["explanations"] == [{"text": "closing brackets", "methodName": None, "modelName": None}]
    assert by[auto]["explanations"][0]["text"] == "numbers"
    assert sum("explanations" in f for f in sent) == 2
    f = by[alive[0]]
    assert f["density"] == pytest.approx(float(stats.a("density")[alive[0]]))
    assert f["topLogits"][0]["token"] == stats.vocab[int(stats.a("pos_idx")[alive[0], 0])]
    tops = [a for a in f["activations"] if a["quantileFraction"] is None]
    assert tops and all(a["quantileMax"] is None for a in tops)
    assert all(0 <= a["quantileFraction"] <= 1 for a in f["activations"] if a["quantileFraction"] is not None)


def test_upload_errors_and_limits(setup):
    out = setup[3]
    srv = Recorder(status=403, reply={"message": "not your source set"})
    try:
        with pytest.raises(NanosaeError, match="HTTP 403: .*not your source set"):
            upload(out, srv.url, "k", send=True, log=lambda s: None)
    finally:
        srv.close()
    with pytest.raises(NanosaeError, match="cannot connect"):
        upload(out, "http://127.0.0.1:9", "k", send=True, log=lambda s: None)
    body = upload_plan(out)[1][1]
    check_upload_body(body)
    f0 = body["features"][0]

    def broken(**change):
        feats = change.pop("features", body["features"])
        return {**body, "features": feats}

    cases = [
        (broken(features=[{**f0, "index": i} for i in range(129)]), "1 to 128"),
        (broken(features=[f0, f0]), "unique"),
        (broken(features=[{**f0, "density": 1.5}]), "density"),
        (broken(features=[{**f0, "activations": []}]), "no activation"),
        (broken(features=[{**f0, "topLogits": f0["topLogits"] * 3}]), "at most 20"),
        (broken(features=[{**f0, "activations": [{**f0["activations"][0], "values": [1.0]}]}]), "one value each"),
        (
            broken(
                features=[
                    {**f0, "activations": [{**f0["activations"][0], "tokens": ["a"] * 1025, "values": [0.0] * 1025}]}
                ]
            ),
            "1 to 1024",
        ),
        (
            broken(features=[{**f0, "explanations": [{"text": "x" * 513, "methodName": None, "modelName": None}]}]),
            "512",
        ),
    ]
    for bad, msg in cases:
        with pytest.raises(NanosaeError, match=msg):
            check_upload_body(bad)


def test_labels_file_and_provenance(tmp_path):
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, hook_name="blocks.0.resid_post"))
    sae.save(tmp_path)
    assert load_labels(tmp_path) == {}
    set_label(tmp_path, 3, "  dogs  ")
    set_label(tmp_path, 4, "auto text", model="m1")
    assert load_labels(tmp_path) == {3: "dogs", 4: "auto text"}
    assert json.loads((tmp_path / "labels.json").read_text()) == {"3": "dogs", "4": "auto text"}
    recs = load_label_records(tmp_path)
    assert recs[3]["source"] == "human" and recs[4] == {"text": "auto text", "source": "auto", "model": "m1"}
    # editing the file by hand makes the label a human one
    (tmp_path / "labels.json").write_text(json.dumps({"3": "dogs", "4": "edited"}))
    assert load_label_records(tmp_path)[4]["source"] == "human"
    set_label(tmp_path, 3, None)
    assert load_labels(tmp_path) == {4: "edited"}
    with pytest.raises(NanosaeError, match="latents 0..15"):
        set_label(tmp_path, 16, "x")
    (tmp_path / "labels.json").write_text("[1, 2]")
    with pytest.raises(NanosaeError, match="labels file"):
        load_labels(tmp_path)


def test_auto_labels_from_a_fake_chat_endpoint(setup, tmp_path):
    stats, sae, _, _ = setup
    sae.save(tmp_path)
    set_label(tmp_path, 10, "human label")
    srv = Recorder(reply={"choices": [{"message": {"role": "assistant", "content": '"Python keywords"\nmore'}}]})
    try:
        alive = [i for i in range(5, 20) if stats.a("density")[i] > 0][:3]
        done = auto_label(stats, tmp_path, srv.url + "/v1", "sk-test", "fake-llm", [0, 10] + alive, log=lambda s: None)
        with pytest.raises(NanosaeError, match="HTTP 401"):
            bad = Recorder(status=401)
            try:
                auto_label(stats, tmp_path, bad.url, None, "m", alive, overwrite=True, log=lambda s: None)
            finally:
                bad.close()
    finally:
        srv.close()
    assert done == {i: "Python keywords" for i in alive}  # the dead latent 0 and the human label 10 are skipped
    recs = load_label_records(tmp_path)
    assert recs[10] == {"text": "human label", "source": "human", "model": None}
    assert all(recs[i] == {"text": "Python keywords", "source": "auto", "model": "fake-llm"} for i in alive)
    path, headers, body = srv.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-test"
    assert body["model"] == "fake-llm" and "<<" in body["messages"][-1]["content"]
    assert len(srv.requests) == len(alive)


def test_cli_export_upload_and_label(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=64, k=4, hook_name="blocks.1.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, 64, generator=g))
        sae.W_dec.copy_(sae.W_enc.T)
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    assert main(["label", "--sae", str(sae_dir), "12", "a <tag> label"]) == 0
    assert main(["label", "--sae", str(sae_dir)]) == 0
    assert "a <tag> label" in capsys.readouterr().out
    assert main(["label", "--sae", str(sae_dir), "99", "x"]) == 2
    out = tmp_path / "np"
    args = ["export", "neuronpedia", "--sae", str(sae_dir), "--model", str(BASE), "--out", str(out)]
    assert main(args + ["--tokens", "512", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "nanochat-d4/1-res-nanosae" in text
    assert (out / "saelens" / "sae_weights.safetensors").is_file()
    assert main(["export", "upload", str(out)]) == 0
    assert "dry run" in capsys.readouterr().out
    assert main(["label", "--sae", str(sae_dir), "12", "--clear"]) == 0
    assert load_labels(sae_dir) == {}
    bad = ["export", "neuronpedia", "--sae", str(tmp_path / "nope"), "--model", str(BASE), "--out", str(out)]
    assert main(bad) == 2
    assert np.isfinite(json.loads((sae_dir / "feature_stats" / "key.json").read_text())["config"]["n_tokens"])
