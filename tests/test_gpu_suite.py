"""bench/gpu_suite.py, which measures nanosae on a CUDA device, in its --smoke form: every section's code runs on
the CPU at tiny shapes and reports finite numbers, so the GPU run cannot die on a path no one ran."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
SECTIONS = ("collect", "train", "eval", "features", "runtime")


def run_suite(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def leaves(obj, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_smoke_runs_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "suite.json"
    r = run_suite(tmp_path, "--smoke", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["device"].startswith("CPU")
    assert res["peak"]["bf16_tflops"] > 0 and res["peak"]["fp32_tflops"] > 0
    for section in SECTIONS:
        assert res[section]["rows"], section
        assert res["seconds"][section] > 0

    # every number is finite; null only where the CPU has no device-memory count
    numbers = 0
    for path, v in leaves(res):
        if v is None:
            assert path.endswith("_mib") or path.startswith(".goals"), path
        elif isinstance(v, float | int) and not isinstance(v, bool):
            assert math.isfinite(v), path
            numbers += 1
    assert numbers > 50

    dims = res["dims"]
    sizes = set(itertools.product(dims["d_saes"], dims["ks"], dims["batches"]))
    train = res["train"]["results"]
    # nanosae's two architectures, and SAELens (a test dependency) on the same batches, at every size
    for impl in ("topk", "batchtopk", "saelens"):
        assert {(t["d_sae"], t["k"], t["batch"]) for t in train if t["impl"] == impl} == sizes, impl
    assert all(t["tok_s"] > 0 and t["pct_bf16_floor"] > 0 for t in train)
    measured = {(t["d_sae"], t["k"], t["batch"]) for t in train if t["impl"] == "sparsify"}
    if measured:  # an optional package: measured where it imports, else the reason it did not
        assert measured == sizes and all("x_sparsify" in t for t in train if t["impl"] == "topk")
    else:
        assert res["train"]["peers_skipped"]["sparsify"]

    for section in ("collect", "eval", "features"):
        assert res[section]["rows"][0]["tok_s"] > 0 and res[section]["rows"][0]["floor_tok_s"] > 0
    assert res["eval"]["ratio"] > 0 and res["features"]["ratio"] > 0 and res["runtime"]["floor"] > 0

    # one line per goal, its status following from the value
    assert len(res["goals"]) == 5
    for g in res["goals"]:
        assert f"{g['status']:7s} {g['goal']}:" in r.stdout
        if g["value"] is None:
            assert g["status"] == "SKIPPED" and g["why"]
        else:
            ok = g["value"] <= g["target"] if g["op"] == "<=" else g["value"] >= g["target"]
            assert g["status"] == ("PASS" if ok else "FAIL"), g


def test_only_runs_the_sections_asked_for(tmp_path):
    out = tmp_path / "suite.json"
    r = run_suite(tmp_path, "--smoke", "--only", "runtime", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "runtime" in res and not any(s in res for s in SECTIONS if s != "runtime")
    statuses = {g["goal"].split()[0]: g["status"] for g in res["goals"]}
    assert statuses["tracking"] in ("PASS", "FAIL") and statuses["collect"] == "SKIPPED"


def test_the_full_suite_refuses_to_run_on_the_cpu(tmp_path):
    r = run_suite(tmp_path, "--device", "cpu")
    assert r.returncode != 0
    assert "use --smoke" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
