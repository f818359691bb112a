"""Activation cache (collect, resume, checksums, torchrun split) and the shuffled streams (cache and model)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nanosae.activations import cache_stream, collect, iter_cache, load_manifest, model_stream
from nanosae.data import token_rows
from nanosae.errors import NanosaeError
from nanosae.hooks import run_with_cache

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
SITE = "blocks.1.resid_post"
SEQ, BATCH, SHARD, TOKENS = 64, 4, 256, 1000  # 4 rows of 64 per forward and per shard: 4 shards of ~250 tokens
SETTINGS = dict(seq_len=SEQ, batch_size=BATCH, shard_tokens=SHARD, progress=False)


def direct(model, tok, site, n, keep_bos=False):
    """The first n (non-BOS) activations at `site`, computed with hooks.run_with_cache batch by batch."""
    rows = token_rows(tok, None, SEQ)
    acts, ids = [], []
    while sum(len(i) for i in ids) < n:
        batch = torch.tensor(list(itertools.islice(rows, BATCH)))
        _, cache = run_with_cache(model, batch, [site])
        keep = torch.ones(batch.numel(), dtype=torch.bool) if keep_bos else batch.flatten() != tok.bos_token_id
        acts.append(cache[site].reshape(-1, cache[site].size(-1))[keep])
        ids.append(batch.flatten()[keep])
    return torch.cat(acts)[:n], torch.cat(ids)[:n]


def cache_tensors(path):
    shards = list(iter_cache(path))
    return {k: torch.cat([s[k] for s in shards]) for k in ("activations", "token_ids", "positions")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these shapes are tiny: a second OpenMP thread only adds spin-waits, 20x slower on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(d4, tmp_path_factory):
    model, tok, _ = d4
    out = tmp_path_factory.mktemp("acts") / "cache"
    collect(model, tok, out, SITE, TOKENS, **SETTINGS)
    return out


def test_collect_equals_direct_forward(d4, cache):
    model, tok, _ = d4
    m = load_manifest(cache)
    assert (m["model_name"], m["site"], m["hook_name"], m["d_in"]) == (
        "nanochat-d4",
        SITE,
        "blocks.1.hook_resid_post",
        128,
    )
    assert (m["dtype"], m["context_size"], m["dataset"], m["total_tokens"]) == ("float32", SEQ, "builtin", TOKENS)
    assert m["model_fingerprint"] == model.info.fingerprint
    assert m["num_shards"] == len(m["shards"]) == 4 and sum(e["tokens"] for e in m["shards"]) == TOKENS
    got = cache_tensors(cache)
    want, ids = direct(model, tok, SITE, TOKENS)
    assert torch.equal(got["activations"], want)  # same batches, same kernels: bitwise
    assert torch.equal(got["token_ids"], ids.int())
    assert not (got["token_ids"] == tok.bos_token_id).any()  # BOS positions are excluded
    assert (got["positions"] > 0).all() and got["positions"].max() < SEQ


def test_keep_bos_and_dtypes(d4, tmp_path):
    model, tok, _ = d4
    collect(model, tok, tmp_path / "bos", SITE, 300, keep_bos=True, **SETTINGS)
    got = cache_tensors(tmp_path / "bos")
    want, ids = direct(model, tok, SITE, 300, keep_bos=True)
    assert torch.equal(got["activations"], want) and got["token_ids"][0] == tok.bos_token_id
    assert got["positions"][:3].tolist() == [0, 1, 2]
    for name, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        collect(model, tok, tmp_path / name, SITE, 300, dtype=name, **SETTINGS)
        got = cache_tensors(tmp_path / name)["activations"]
        assert got.dtype == dtype and torch.equal(got, direct(model, tok, SITE, 300)[0].to(dtype))
        batch = next(cache_stream(tmp_path / name, 64, buffer_tokens=1000))
        assert batch.dtype == torch.float32 and batch.shape == (64, 128)


def test_rerun_of_complete_cache_is_a_noop_and_mismatch_is_refused(d4, cache):
    model, tok, _ = d4
    before = (cache / "manifest.json").read_text()
    collect(model, tok, cache, SITE, TOKENS, **SETTINGS)
    assert (cache / "manifest.json").read_text() == before
    for change, field in [
        (dict(site="blocks.2.resid_post"), "site"),
        (dict(dtype="bf16"), "dtype"),
        (dict(tokens=TOKENS + 1), "tokens"),
    ]:
        args = dict(site=SITE, tokens=TOKENS, **SETTINGS) | change
        with pytest.raises(NanosaeError, match=f"{field}="):
            collect(model, tok, cache, **args)
    assert (cache / "manifest.json").read_text() == before


def test_resume_after_a_crash_equals_an_uninterrupted_run(d4, cache, tmp_path, monkeypatch):
    from nanosae import activations

    model, tok, _ = d4
    real, written = activations._ShardWriter._write, []

    def crash_after_two(self, index, rows, tensors):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(index)
        real(self, index, rows, tensors)

    monkeypatch.setattr(activations._ShardWriter, "_write", crash_after_two)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect(model, tok, out, SITE, TOKENS, **SETTINGS)
    monkeypatch.setattr(activations._ShardWriter, "_write", real)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    (out / ".shard_00002.safetensors.999999999.a1b2c3d4.tmp").write_bytes(b"half a shard")  # its writer was killed
    (out / ".notes.tmp").write_text("not ours")
    (out / "shard_00003.safetensors").write_bytes(b"written but never recorded")
    with pytest.raises(NanosaeError, match="incomplete"):
        cache_stream(out, 8)
    forwards, site_acts = [], activations._site_acts
    monkeypatch.setattr(activations, "_site_acts", lambda *a: forwards.append(1) or site_acts(*a))
    collect(model, tok, out, SITE, TOKENS, **SETTINGS)
    assert [p.name for p in out.glob(".*.tmp")] == [".notes.tmp"] and not list(out.glob("progress-*"))
    assert json.loads((out / "manifest.json").read_text())["shards"] == load_manifest(cache)["shards"]
    for name in ("shard_00000.safetensors", "shard_00003.safetensors"):
        assert (out / name).read_bytes() == (cache / name).read_bytes()
    assert len(forwards) == 2  # one forward per shard: only shards 2 and 3 were computed again


def test_kill_9_mid_run_then_same_command_resumes(d4, tmp_path, capsys):
    from nanosae.cli import main

    model, tok, _ = d4
    out = tmp_path / "killed"
    args = ["collect", "--model", str(MODEL), "--layer", "0", "--out", str(out), "--tokens", "3000"]
    args += ["--seq-len", "64", "--batch-size", "2", "--shard-tokens", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanosae", *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        progress = out / "progress-r0.json"
        if progress.is_file() and len(json.loads(progress.read_text())["shards"]) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"], "the run ended before it was killed"
    assert main(args) == 0  # the same command again, in this process
    assert "kept from an earlier run" in capsys.readouterr().out
    ref = tmp_path / "uninterrupted"
    collect(model, tok, ref, "blocks.0.resid_post", 3000, seq_len=64, batch_size=2, shard_tokens=128, progress=False)
    assert load_manifest(out)["shards"] == load_manifest(ref)["shards"]  # same files, same checksums


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_named(d4, cache, tmp_path, damage):
    model, tok, _ = d4
    out = tmp_path / "damaged"
    shutil.copytree(cache, out)
    shard = out / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
        shard.write_bytes(data)
        stream = cache_stream(out, 100, buffer_tokens=TOKENS)
        with pytest.raises(NanosaeError, match=r"shard_00002\.safetensors: shard is corrupt") as e:
            next(stream)
    else:
        shard.write_bytes(data[: len(data) // 2])
        with pytest.raises(NanosaeError, match=r"shard_00002\.safetensors: shard is truncated") as e:
            cache_stream(out, 100)
    assert "\n" not in str(e.value)
    with pytest.raises(NanosaeError, match=r"shard_00002\.safetensors: shard is (corrupt|truncated)"):
        collect(model, tok, out, SITE, TOKENS, **SETTINGS)  # a re-run verifies what it keeps
    shard.unlink()  # the fix the message names: delete it and re-run
    collect(model, tok, out, SITE, TOKENS, **SETTINGS)
    assert shard.read_bytes() == (cache / shard.name).read_bytes()


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_cache_stream_shuffles_deterministically_and_resumes_exactly(cache):
    all_rows = cache_tensors(cache)["activations"]
    s = cache_stream(cache, 96, seed=1, buffer_tokens=400)
    assert (s.d_in, s.site, s.model_name, s.context_size, s.dataset) == (128, SITE, "nanochat-d4", SEQ, "builtin")
    first = take(s, 10)  # 10 * 96 of 1000 rows: one epoch less a few rows
    assert all(b.shape == (96, 128) and b.dtype == torch.float32 for b in first)
    seen = torch.cat(first)
    assert len(torch.unique(seen, dim=0)) == len(seen)  # no row twice within an epoch
    assert len(torch.unique(torch.cat([seen, all_rows]), dim=0)) == len(all_rows)  # all rows come from the cache
    assert not torch.equal(seen[:96], all_rows[:96])  # shuffled
    assert all(torch.equal(a, b) for a, b in zip(first, take(cache_stream(cache, 96, seed=1, buffer_tokens=400), 10)))
    assert not torch.equal(first[0], next(cache_stream(cache, 96, seed=2, buffer_tokens=400)))
    # exact resume through an epoch boundary, from a JSON round trip of the state
    state = json.loads(json.dumps(s.state()))
    assert len(json.dumps(state)) < 400
    cont = take(s, 6)
    resumed = cache_stream(cache, 96, seed=1, buffer_tokens=400, state=state)
    assert all(torch.equal(a, b) for a, b in zip(cont, take(resumed, 6)))
    assert s.peak_buffered_tokens <= 400 and resumed.peak_buffered_tokens <= 400  # bounded RAM
    with pytest.raises(NanosaeError, match="does not belong"):
        cache_stream(cache, 96, seed=2, buffer_tokens=400, state=state)


def test_cache_stream_rank_split_is_the_one_rank_batch(cache):
    whole = take(cache_stream(cache, 64, seed=3, buffer_tokens=300), 20)
    r0 = cache_stream(cache, 64, seed=3, rank=0, world_size=2, buffer_tokens=300)
    r1 = cache_stream(cache, 64, seed=3, rank=1, world_size=2, buffer_tokens=300)
    parts = [torch.cat([a, b]) for a, b in zip(take(r0, 12), take(r1, 12))]
    r1 = cache_stream(cache, 64, seed=3, rank=1, world_size=2, buffer_tokens=300, state=r0.state())
    r0 = cache_stream(cache, 64, seed=3, rank=0, world_size=1, buffer_tokens=300, state=r0.state())  # 2 -> 1 rank
    parts += take(r0, 8)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))
    assert next(r1).shape == (32, 128)


def test_model_stream(d4):
    model, tok, _ = d4
    kw = dict(seq_len=SEQ, seed=0, buffer_tokens=4 * SEQ, forward_rows=2)  # a fill is 4 rows, 2 per forward
    s = model_stream(model, tok, SITE, None, 1, **kw)
    assert (s.d_in, s.site, s.model_name, s.context_size) == (128, SITE, "nanochat-d4", SEQ)
    want, _ = direct(model, tok, SITE, 10_000)
    n_fill = sum(
        int((torch.tensor(r) != tok.bos_token_id).sum()) for r in itertools.islice(token_rows(tok, None, SEQ), 4)
    )
    got = torch.cat(take(s, n_fill))
    key = torch.randn(128, dtype=torch.float64)
    sort = lambda x: x[torch.argsort(x.double() @ key)]  # noqa: E731
    assert torch.equal(sort(got), sort(want[:n_fill]))  # the first fill, shuffled, BOS excluded
    assert not torch.equal(got, want[:n_fill])
    s = model_stream(model, tok, SITE, None, 100, **kw)
    first = take(s, 4)
    state = json.loads(json.dumps(s.state()))
    cont = take(s, 4)
    assert all(
        torch.equal(a, b) for a, b in zip(cont, take(model_stream(model, tok, SITE, None, 100, state=state, **kw), 4))
    )
    r1 = model_stream(model, tok, SITE, None, 100, rank=1, world_size=2, **kw)
    assert all(torch.equal(a[50:], b) for a, b in zip(first, take(r1, 4)))
    assert s.peak_buffered_tokens <= 4 * SEQ


def test_bad_inputs(d4, cache, tmp_path):
    model, tok, _ = d4
    with pytest.raises(NanosaeError, match="layers 0..3"):
        collect(model, tok, tmp_path / "a", "blocks.7.resid_post", 100, **SETTINGS)
    with pytest.raises(NanosaeError, match="unknown site"):
        collect(model, tok, tmp_path / "a", "blocks.1.resid_sideways", 100, **SETTINGS)
    with pytest.raises(NanosaeError, match="fp32, bf16 or fp16"):
        collect(model, tok, tmp_path / "a", SITE, 100, dtype="int8", **SETTINGS)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(NanosaeError, match="not empty"):
        collect(model, tok, tmp_path / "full", SITE, 100, **SETTINGS)
    with pytest.raises(NanosaeError, match="does not exist"):
        cache_stream(tmp_path / "missing", 8)
    with pytest.raises(NanosaeError, match="has no manifest.json"):
        cache_stream(tmp_path / "full", 8)
    with pytest.raises(NanosaeError, match="must divide by world_size"):
        cache_stream(cache, 9, world_size=2)
    with pytest.raises(NanosaeError, match="layers 0..3"):
        model_stream(model, tok, "blocks.4.resid_post", None, 8)
    from nanosae.cli import main

    assert main(["collect", "--model", str(MODEL), "--layer", "9", "--tokens", "10", "--out", str(tmp_path / "b")]) == 2
    assert (
        main(["collect", "--model", str(MODEL), "--site", "mlp_out", "--tokens", "10", "--out", str(tmp_path / "b")])
        == 2
    )


TORCHRUN_SCRIPT = """
import sys, json, torch, torch.distributed as dist
from nanosae.cli import main
from nanosae.activations import model_stream
from nanosae import load_model
dist.init_process_group("gloo")
assert main(sys.argv[1:]) == 0
model, tok, _ = load_model("{model}")
s = model_stream(model, tok, "{site}", None, 64, seq_len=64, buffer_tokens=512, forward_rows=2,
                 rank=dist.get_rank(), world_size=2)
torch.save([next(s) for _ in range(10)], "{out}/stream_r%d.pt" % dist.get_rank())
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_equal_one_rank(d4, cache, tmp_path):
    """Real torchrun, 2 gloo ranks on CPU: the CLI's collection and model_stream's all-gathered fills."""
    model, tok, _ = d4
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(model=MODEL, site=SITE, out=tmp_path)))
    out = tmp_path / "ddp"
    args = ["--model", str(MODEL), "--layer", "1", "--tokens", str(TOKENS), "--out", str(out), "--seq-len", str(SEQ)]
    args += ["--batch-size", str(BATCH), "--shard-tokens", str(SHARD)]
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), "collect", *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_manifest(out)["shards"] == load_manifest(cache)["shards"]  # same bytes as the 1-rank cache
    whole = take(model_stream(model, tok, SITE, None, 64, seq_len=64, buffer_tokens=512, forward_rows=2), 10)
    ranks = [torch.load(tmp_path / f"stream_r{r}.pt", weights_only=True) for r in (0, 1)]
    for w, a, b in zip(whole, *ranks):
        torch.testing.assert_close(torch.cat([a, b]), w, rtol=0, atol=1e-6)
