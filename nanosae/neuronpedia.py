"""Neuronpedia export and upload (docs/formats.md, "Neuronpedia export"): everything Neuronpedia takes, from the feature statistics.

    out/saelens/                          the SAE as a SAELens folder (+ sparsity.safetensors, neuronpedia_id)
    out/dashboard/{model}_{set}_{hook}_{d_sae}/
        batch-N.json                      SAEDashboard NeuronpediaRunner batches, 128 latents each
        run_settings.json, skipped_indexes.json
    out/exports/{model}/{layer}-{set}/    the neuronpedia-utils bulk-import layout
        release.jsonl model.jsonl sourceset.jsonl source.jsonl
        features/batch-N.jsonl.gz activations/batch-N.jsonl.gz [explanations/batch-N.jsonl.gz]

Ids follow Neuronpedia's naming: model id = the model's name (nanochat-d20), source set = hook kind + "nanosae"
(res-nanosae), source = "{layer}-{set}", so a latent lives at nanochat-d20/10-res-nanosae/1234.

Upload (path C) posts the dashboard batches to a Neuronpedia API: POST {base}/api/source-set/new, then
POST {base}/api/feature/upload-batch with at most 128 latents per call; dry run unless asked to send.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json
from .hooks import parse_site, saelens_hook_name

SET_KIND = {
    "resid_post": "res",
    "resid_pre": "res_pre",
    "resid_mid": "res_mid",
    "attn_out": "att",
    "mlp_out": "mlp",
    "mlp_in": "mlp_in",
    "mlp_hidden": "mlp_post",
    "embed": "emb",
    "final": "ln_final",
}
BATCH = 128  # latents per dashboard batch file and per upload call
MAX_LOGITS = 20
MAX_TOKENS = 1024
DEFAULT_API = "https://www.neuronpedia.org"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def names(stats, model_id: str | None = None, set_name: str | None = None) -> dict:
    """model id, layer, source set and source (the SAE id) for these statistics."""
    layer, kind = parse_site(stats.meta["site"])
    model_id = model_id or stats.meta["model_name"] or "nanochat"
    # a transcoder's set says so, as Neuronpedia's transcoder sources do (e.g. gemmascope-transcoder-16k)
    set_name = set_name or ("transcoder-nanosae" if stats.meta.get("site_out") else f"{SET_KIND[kind]}-nanosae")
    for what, v in (("model id", model_id), ("source set name", set_name)):
        if not _ID_RE.fullmatch(v):
            raise NanosaeError(
                f"{what} {v!r} must be letters, digits, '.', '_' or '-' (e.g. nanochat-d20, res-nanosae)"
            )
    layer = layer or 0  # embed (and final) have no block: Neuronpedia still wants a number
    return {
        "model_id": model_id,
        "layer": layer,
        "set_name": set_name,
        "source": f"{layer}-{set_name}",
        "hook_name": saelens_hook_name(stats.meta["site"]),
    }


def _r3(a) -> list:
    return [round(x, 3) for x in np.asarray(a, dtype=np.float64).reshape(-1).tolist()]  # Python floats: fast round


def _sig(x: float) -> float:
    return float(f"{float(x):.4g}")


def _activations(stats, i: int) -> list[dict]:
    """The top group (bin_min -1, bin_max max, bin_contains -1) then the interval groups, as SAEDashboard."""
    vocab, mx = stats.vocab, float(stats.a("max")[i])
    out = []
    groups = [(-1, mx, -1, stats.examples(i))]
    groups += [(iv["min"], iv["max"], iv["contains"], iv["examples"]) for iv in stats.intervals(i)]
    for lo, hi, contains, examples in groups:
        for e in examples:
            out.append(
                {
                    "bin_min": lo if lo == -1 else _sig(lo),
                    "bin_max": _sig(hi),
                    "bin_contains": contains if contains == -1 else _sig(contains),
                    "tokens": [vocab[t] for t in e["tokens"]],
                    "values": _r3(e["values"]),
                    "qualifying_token_index": e["index"],
                }
            )
    return out


def dashboard_feature(stats, i: int) -> dict:
    """One latent in the SAEDashboard batch schema (every field SAEDashboard's Neuronpedia runner writes, in its order)."""
    a, vocab, m = stats.a, stats.vocab, stats.meta
    act_c, act_h = stats.act_hist(i)
    log_c, log_h = stats.logit_hist(i)
    cf = a("cf_idx")[i] >= 0
    return {
        "feature_index": i,
        "neuron_alignment_indices": a("na_idx")[i].tolist(),
        "neuron_alignment_values": _r3(a("na_val")[i]),
        "neuron_alignment_l1": _r3(a("na_l1")[i]),
        "correlated_neurons_indices": a("cn_idx")[i].tolist(),
        "correlated_neurons_pearson": _r3(a("cn_pearson")[i]),
        "correlated_neurons_l1": _r3(a("cn_cos")[i]),  # SAEDashboard stores the cosine under *_l1
        "correlated_features_indices": a("cf_idx")[i][cf].tolist(),
        "correlated_features_pearson": _r3(a("cf_pearson")[i][cf]),
        "correlated_features_l1": _r3(a("cf_cos")[i][cf]),
        "pos_str": [vocab[t] for t in a("pos_idx")[i]],
        "pos_values": _r3(a("pos_val")[i]),
        "neg_str": [vocab[t] for t in a("neg_idx")[i]],
        "neg_values": _r3(a("neg_val")[i]),
        "frac_nonzero": float(a("density")[i]),
        "freq_hist_data_bar_values": [_sig(x) for x in act_c],
        "freq_hist_data_bar_heights": act_h,
        "logits_hist_data_bar_values": [_sig(x) for x in log_c],
        "logits_hist_data_bar_heights": log_h,
        "n_prompts_total": m["n_prompts"],
        "n_tokens_in_prompt": m["seq_len"],
        "dataset": m["dataset"],
        "decoder_weights_dist": [],
        "vector": [],
        "activations": _activations(stats, i),
    }


def _jsonl_gz(path: Path, rows: list[dict], io: ThreadPoolExecutor) -> Future:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    # mtime 0: same input, same bytes; level 6 compresses nearly as well as 9 in a third of the time. zlib releases
    # the GIL, so the compression runs on the side while the next batch is built.
    return io.submit(atomic_write, path, lambda f: f.write(gzip.compress(data, 6, mtime=0)))


def _jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")))


def _id(*parts) -> str:
    return "nsae" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:21]


def check_exportable(sae) -> None:
    """An export is SAELens weights plus what Neuronpedia reads: nanochat PR #169's signed SAEs have neither form."""
    from .sae import SignedSAE

    if sae.cfg.architecture in SignedSAE.notes:
        raise NanosaeError(
            f"a {sae.cfg.architecture} SAE (nanochat PR #169's, latents with a sign) has no SAELens or Neuronpedia "
            "form, so it cannot be exported; train a nanosae SAE on the same site to publish one"
        )


def export_neuronpedia(
    stats,
    sae,
    out_dir: str | os.PathLike,
    labels: dict[int, dict] | None = None,
    model_id: str | None = None,
    set_name: str | None = None,
    creator: str = "nanosae",
    hf_repo: str | None = None,
    log_sparsity: float = -8.0,
    created_at: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the SAELens weights, the dashboard batches and the bulk-import layout. Latents whose log10 density
    is below log_sparsity (never-active ones, by default) are skipped and listed, as SAEDashboard does.
    `labels` maps an index to a label record (labels.load_label_records)."""
    from tqdm import tqdm

    out = Path(out_dir)
    n = names(stats, model_id, set_name)
    mid, src, sset, layer = n["model_id"], n["source"], n["set_name"], n["layer"]
    now = created_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    labels = labels or {}
    check_exportable(sae)
    if sae.cfg.d_sae != stats.d_sae:
        raise NanosaeError(
            f"the statistics are for {stats.d_sae} latents but the SAE has {sae.cfg.d_sae}; recompute them"
        )
    weights = _write_weights(stats, sae, out / "saelens", mid, src)
    # path A: SAEDashboard batches; path B: the bulk-import layout, batch by batch alongside path A
    dash = out / "dashboard" / f"{mid}_{sset}_{n['hook_name']}_{stats.d_sae}"
    kept = _write_run_settings(stats, n, dash, log_sparsity)
    exp = out / "exports" / mid / src
    common = {"creatorId": creator, "createdAt": now}
    _write_bulk_headers(stats, n, exp, creator, hf_repo, common)
    written = []
    with ThreadPoolExecutor(1) as io:
        for b, s in enumerate(tqdm(range(0, len(kept), BATCH), desc="export", unit="batch", disable=not progress)):
            feats = [dashboard_feature(stats, i) for i in kept[s : s + BATCH]]
            atomic_write_json(
                dash / f"batch-{b}.json",
                {"model_id": mid, "layer": layer, "sae_set": sset, "sae_id_suffix": None, "features": feats},
                indent=None,
            )
            f_rows = [_feature_record(stats, f, n, common) for f in feats]
            a_rows = [r for f in feats for r in _activation_records(f, n, stats.meta["dataset"], creator, now)]
            e_rows = [_explanation_record(f["feature_index"], labels, n, creator, now) for f in feats]
            e_rows = [r for r in e_rows if r is not None]
            written.append(_jsonl_gz(exp / "features" / f"batch-{b}.jsonl.gz", f_rows, io))
            written.append(_jsonl_gz(exp / "activations" / f"batch-{b}.jsonl.gz", a_rows, io))
            if e_rows:
                written.append(_jsonl_gz(exp / "explanations" / f"batch-{b}.jsonl.gz", e_rows, io))
    for w in written:
        w.result()  # raises what a write raised
    return {"saelens": weights, "dashboard": dash, "exports": exp}


def _write_weights(stats, sae, path: Path, model_id: str, source: str) -> Path:
    """The weights as a SAELens folder (log10 densities as sparsity) that knows its Neuronpedia id."""
    density = torch.from_numpy(stats.a("density").astype(np.float32))
    weights = sae.save(path, sparsity=torch.log10(density.clamp(min=1e-10)))
    cfg = json.loads((weights / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["neuronpedia_id"] = f"{model_id}/{source}"
    cfg["metadata"]["model_name"] = cfg["metadata"].get("model_name") or model_id
    atomic_write_json(weights / "cfg.json", cfg)
    return weights


def _write_run_settings(stats, n: dict, dash: Path, log_sparsity: float) -> list[int]:
    """SAEDashboard's run_settings.json and skipped_indexes.json; returns the latents kept (the others' log10
    density is below log_sparsity)."""
    m, d = stats.meta, stats.a("density")
    with np.errstate(divide="ignore"):
        skipped = [int(i) for i in np.nonzero(np.log10(d) < log_sparsity)[0]]
    run_settings = {
        "generator": "nanosae",
        "model_id": n["model_id"],
        "sae_set": n["set_name"],
        "layer": n["layer"],
        "hook_name": n["hook_name"],
        "nanosae_site": m["site"],
        **(
            {"hook_name_out": saelens_hook_name(m["site_out"]), "nanosae_site_out": m["site_out"]}
            if m.get("site_out")
            else {}
        ),
        "d_sae": stats.d_sae,
        "architecture": m["architecture"],
        "n_prompts_total": m["n_prompts"],
        "n_tokens_in_prompt": m["seq_len"],
        "n_tokens_counted": m["n_tokens"],
        "dataset": m["dataset"],
        "n_features_at_a_time": BATCH,
        "top_acts_group_size": m["config"]["top_k"],
        "n_quantiles": m["config"]["n_intervals"],
        "quantile_group_size": m["config"]["interval_samples"],
        "context_window": [m["config"]["ctx_before"], m["config"]["ctx_after"]],
        "sparsity_threshold": log_sparsity,
        "ignore_tokens": m["special_ids"],
    }
    atomic_write_json(dash / "run_settings.json", run_settings)
    where = {"model_id": n["model_id"], "layer": n["layer"], "sae_set": n["set_name"]}
    atomic_write_json(
        dash / "skipped_indexes.json", {**where, "log_sparsity": log_sparsity, "skipped_indexes": skipped}
    )
    return sorted(set(range(stats.d_sae)) - set(skipped))


def _write_bulk_headers(stats, n: dict, exp: Path, creator: str, hf_repo: str | None, common: dict) -> None:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl of the bulk-import layout."""
    m, mid, sset, now = stats.meta, n["model_id"], n["set_name"], common["createdAt"]
    release = {
        "name": f"{mid}-{sset}",
        "description": f"nanosae {m['architecture']} SAEs on {mid}, {m['site']}",
        "descriptionShort": f"nanosae {sset}",
        "urls": [f"https://huggingface.co/{hf_repo}"] if hf_repo else [],
        "creatorName": creator,
        "creatorNameShort": creator,
        **common,
    }
    instruct = mid.endswith(("-sft", "-rl"))
    model = {"id": mid, "instruct": instruct, "displayName": mid, "displayNameShort": mid, **common, "updatedAt": now}
    sourceset = {
        "modelId": mid,
        "name": sset,
        "description": f"{m['site']} · {stats.d_sae} latents ({m['architecture']})",
        "creatorName": creator,
        "releaseName": f"{mid}-{sset}",
        "visibility": "PUBLIC",
        **common,
    }
    source = {
        "id": n["source"],
        "modelId": mid,
        "setName": sset,
        "dataset": m["dataset"],
        "num_prompts": m["n_prompts"],
        "num_tokens_in_prompt": m["seq_len"],
        "hfRepoId": hf_repo,
        "hfFolderId": "saelens" if hf_repo else None,
        "visibility": "PUBLIC",
        **common,
    }
    for name, record in (("release", release), ("model", model), ("sourceset", sourceset), ("source", source)):
        _jsonl(exp / f"{name}.jsonl", [record])


def _feature_record(stats, f: dict, n: dict, common: dict) -> dict:
    """A latent's features/ record: its dashboard fields (less the activations) with Neuronpedia's own."""
    i = f["feature_index"]
    mx = float(stats.a("max")[i])
    skip = ("feature_index", "activations", "vector", "n_prompts_total", "n_tokens_in_prompt", "dataset")
    return {
        "modelId": n["model_id"],
        "layer": n["source"],
        "index": str(i),
        **common,
        "maxActApprox": round(mx, 3),
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": round(mx, 3),
        "hookName": n["hook_name"],
        "topkCosSimIndices": stats.a("nb_idx")[i].tolist(),
        "topkCosSimValues": _r3(stats.a("nb_cos")[i]),
        **{k: v for k, v in f.items() if k not in skip},
        "sourceSetName": n["set_name"],
    }


def _activation_records(f: dict, n: dict, dataset: str, creator: str, now: str) -> list[dict]:
    """A latent's activations/ records, one per example of its dashboard feature."""
    i, mid, src, rows = f["feature_index"], n["model_id"], n["source"], []
    for k, act in enumerate(f["activations"]):
        vals = act["values"]
        rows.append(
            {
                "id": _id(mid, src, i, k),
                "tokens": act["tokens"],
                "index": str(i),
                "layer": src,
                "modelId": mid,
                "maxValue": max(vals),
                "maxValueTokenIndex": vals.index(max(vals)),  # the first, as argmax
                "minValue": min(vals),
                "values": vals,
                "creatorId": creator,
                "binMin": act["bin_min"],
                "binMax": act["bin_max"],
                "binContains": act["bin_contains"],
                "qualifyingTokenIndex": act["qualifying_token_index"],
                "dfaValues": [],
                "dfaTargetIndex": None,
                "dfaMaxValue": None,
                "lossValues": [],
                "logitContributions": None,
                "dataSource": dataset,
                "dataIndex": None,
                "createdAt": now,
            }
        )
    return rows


def _explanation_record(i: int, labels: dict[int, dict], n: dict, creator: str, now: str) -> dict | None:
    """The explanations/ record of a labelled latent (None without a label)."""
    if i not in labels:
        return None
    rec = labels[i]
    auto = rec.get("source") == "auto"
    return {
        "id": _id("explanation", n["model_id"], n["source"], i),
        "modelId": n["model_id"],
        "layer": n["source"],
        "index": str(i),
        "description": rec["text"],
        "authorId": creator,
        "typeName": "nanosae-auto" if auto else "human",
        "explanationModelName": rec.get("model") if auto else None,
        "embedding": None,
        "triggeredById": None,
        "notes": None,
        "createdAt": now,
    }


# ------------------------------------------------------------------------------------------------- upload


def _read_export(export_dir: Path) -> tuple[list[dict], dict[int, str], Path]:
    dashes = sorted(p for p in (export_dir / "dashboard").glob("*") if (p / "run_settings.json").is_file())
    if len(dashes) != 1:
        raise NanosaeError(
            f"{export_dir}: expected one dashboard/<model>_<set>_<hook>_<d_sae>/ folder, found {len(dashes)}; "
            "pass the --out folder of `nanosae export neuronpedia`"
        )
    files = sorted(dashes[0].glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    try:
        batches = [json.loads(p.read_text()) for p in files]
    except ValueError as e:
        raise NanosaeError(f"{dashes[0]}: a batch file is not valid JSON ({e}); export again") from None
    explanations = {}
    for p in export_dir.glob("exports/*/*/explanations/batch-*.jsonl.gz"):
        for line in gzip.decompress(p.read_bytes()).decode("utf-8").splitlines():
            e = json.loads(line)
            explanations[int(e["index"])] = e["description"]
    return batches, explanations, dashes[0]


def upload_feature(f: dict, explanation: str | None) -> dict | None:
    """A dashboard feature as the upload API takes it (None when it has no activation to show)."""
    acts = []
    for a in f["activations"]:
        top = a["bin_contains"] == -1
        n = min(len(a["tokens"]), MAX_TOKENS)
        acts.append(
            {
                "tokens": a["tokens"][:n],
                "values": a["values"][:n],
                "quantileMax": None if top else a["bin_max"],
                "quantileMin": None if top else a["bin_min"],
                "quantileFraction": None if top else min(1.0, max(0.0, a["bin_contains"])),
            }
        )
    if not acts:
        return None
    out = {
        "index": f["feature_index"],
        "density": min(1.0, max(0.0, f["frac_nonzero"])),
        "topLogits": [{"token": t, "value": v} for t, v in zip(f["pos_str"], f["pos_values"])][:MAX_LOGITS],
        "bottomLogits": [{"token": t, "value": v} for t, v in zip(f["neg_str"], f["neg_values"])][:MAX_LOGITS],
        "activations": acts,
    }
    if explanation:
        out["explanations"] = [{"text": explanation[:512], "methodName": None, "modelName": None}]
    return out


def check_upload_body(body: dict) -> None:
    """The upload route's constraints (docs/formats.md); a NanosaeError names the first one broken."""
    feats = body.get("features", [])
    if not body.get("modelId") or not body.get("source"):
        raise NanosaeError("an upload needs modelId and source")
    if not 1 <= len(feats) <= BATCH:
        raise NanosaeError(f"an upload carries 1 to {BATCH} features (got {len(feats)})")
    idx = [f["index"] for f in feats]
    if len(set(idx)) != len(idx) or not all(isinstance(i, int) and 0 <= i <= 10**7 for i in idx):
        raise NanosaeError("feature indices must be unique integers in [0, 1e7]")
    for f in feats:
        i = f["index"]
        if not f["activations"]:
            raise NanosaeError(f"feature {i} has no activation")
        if not 0 <= f["density"] <= 1:
            raise NanosaeError(f"feature {i}: density {f['density']} is outside [0, 1]")
        if len(f["topLogits"]) > MAX_LOGITS or len(f["bottomLogits"]) > MAX_LOGITS:
            raise NanosaeError(f"feature {i}: at most {MAX_LOGITS} top and bottom logits")
        for a in f["activations"]:
            if len(a["tokens"]) != len(a["values"]) or not 0 < len(a["tokens"]) <= MAX_TOKENS:
                raise NanosaeError(f"feature {i}: an activation needs 1 to {MAX_TOKENS} tokens, one value each")
            q = a["quantileFraction"]
            if q is not None and not 0 <= q <= 1:
                raise NanosaeError(f"feature {i}: quantileFraction {q} is outside [0, 1]")
            if not all(math.isfinite(v) for v in a["values"]):
                raise NanosaeError(f"feature {i}: activation values must be finite")
        for e in f.get("explanations", []):
            if not 1 <= len(e["text"]) <= 512:
                raise NanosaeError(f"feature {i}: an explanation is 1 to 512 characters")


def upload_plan(export_dir: str | os.PathLike, description: str | None = None) -> list[tuple[str, dict]]:
    """The requests an upload makes: (API path, JSON body), source set first, then ≤128 features each."""
    batches, explanations, dash = _read_export(Path(export_dir))
    settings = json.loads((dash / "run_settings.json").read_text())
    mid, sset, layer = settings["model_id"], settings["sae_set"], settings["layer"]
    plan = [
        (
            "/api/source-set/new",
            {
                "name": sset,
                "modelId": mid,
                "description": description or f"nanosae {settings['architecture']} SAE, {settings['nanosae_site']}",
                "url": None,
            },
        )
    ]
    feats = [upload_feature(f, explanations.get(f["feature_index"])) for b in batches for f in b["features"]]
    feats = [f for f in feats if f is not None]
    for s in range(0, len(feats), BATCH):
        body = {"modelId": mid, "source": f"{layer}-{sset}", "features": feats[s : s + BATCH]}
        check_upload_body(body)
        plan.append(("/api/feature/upload-batch", body))
    return plan


def upload(
    export_dir: str | os.PathLike,
    api_base: str = DEFAULT_API,
    api_key: str | None = None,
    send: bool = False,
    source_set: bool = True,
    timeout: float = 300,
    log: Callable[[str], None] = print,
) -> int:
    """Post the export to a Neuronpedia API (dry run unless send): returns the number of requests made/planned."""
    plan = upload_plan(export_dir)
    if not source_set:
        plan = plan[1:]
    api_key = api_key or os.environ.get("NEURONPEDIA_API_KEY")
    base = api_base.rstrip("/")
    if send and not api_key:
        raise NanosaeError("uploading needs an API key: pass --api-key or set NEURONPEDIA_API_KEY")
    for path, body in plan:
        data = json.dumps(body).encode("utf-8")
        what = f"{len(body['features'])} features" if "features" in body else f"source set {body['name']}"
        if not send:
            log(f"would POST {base}{path}  ({what}, {len(data):,} bytes)")
            continue
        req = urllib.request.Request(
            base + path, data=data, method="POST", headers={"Content-Type": "application/json", "x-api-key": api_key}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise NanosaeError(f"POST {base}{path} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise NanosaeError(f"POST {base}{path}: cannot connect ({e}); check --api-base") from None
        log(f"POST {base}{path}  ({what}): ok")
    if not send:
        first = next((b for p, b in plan if "features" in b), None)
        if first:
            sample = json.dumps(first["features"][0], ensure_ascii=False)
            log(f"first feature: {sample[:1200]}{' …' if len(sample) > 1200 else ''}")
        log("dry run: nothing was sent; add --send (and an API key) to upload")
    return len(plan)
