"""Every layer from one forward pass: site lists and globs, the several-site model stream (each site's rows equal
a one-site stream's, one forward per batch of rows), trainers that own some sites equal one trainer of all, and
`nanosae train|collect --layers` end to end (folders, resume after a crash, one cache per site)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanosae import activations
from nanosae.activations import collect, collect_sites, load_manifest, model_stream, ranks_sites
from nanosae.cli import main
from nanosae.errors import NanosaeError
from nanosae.hooks import expand_sites
from nanosae.sae import SAETrainConfig, load_sae
from nanosae.train import TrainConfig, Trainer, read_checkpoint, train

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
SEQ = 64
A, B = "blocks.1.resid_post", "blocks.3.mlp_hidden"  # 128 and 512 wide


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_site_specs_expand_in_forward_order():
    assert expand_sites("resid_post", 4, "all") == [f"blocks.{i}.resid_post" for i in range(4)]
    assert expand_sites("mlp_out,resid_pre", 4, "3,1") == [
        "blocks.1.resid_pre",
        "blocks.1.mlp_out",
        "blocks.3.resid_pre",
        "blocks.3.mlp_out",
    ]
    assert expand_sites("final,blocks.*.attn_out,embed", 2) == [
        "embed",
        "blocks.0.attn_out",
        "blocks.1.attn_out",
        "final",
    ]
    assert expand_sites("blocks.2.hook_resid_post,blocks.0.mlp_out", 4) == ["blocks.0.mlp_out", "blocks.2.resid_post"]
    for spec, layers, message in [
        ("resid_post", "0,7", "layers 0..3"),
        ("resid_post", "x", "comma list of layers"),
        ("blocks.1.resid_post", "all", "site kinds"),
        ("blocks.*.resid_mud", None, "matches no site"),
        ("blocks.9.resid_post", None, "layers 0..3"),
    ]:
        with pytest.raises(NanosaeError, match=message):
            expand_sites(spec, 4, layers)
    assert ranks_sites(list("abcde"), 2) == [["a", "b"], ["c", "d", "e"]]


def test_a_several_site_stream_gives_each_site_the_rows_of_its_own_stream_from_one_forward(d4, monkeypatch):
    model, tok, _ = d4
    kw = dict(seq_len=SEQ, seed=0, buffer_tokens=4 * SEQ, forward_rows=2)
    forwards, site_acts = [], activations._site_acts
    monkeypatch.setattr(
        activations, "_site_acts", lambda m, ids, sites: forwards.append(sites) or site_acts(m, ids, sites)
    )
    both = model_stream(model, tok, [A, B], None, 100, **kw)
    assert both.sites == [A, B] and both.widths == {A: 128, B: 512}
    got = take(both, 6)
    assert forwards and all(f == [A, B] for f in forwards)  # one forward serves both sites
    n_both = len(forwards)
    for site in (A, B):
        forwards.clear()
        alone = take(model_stream(model, tok, site, None, 100, **kw), 6)
        assert len(forwards) == n_both
        assert all(torch.equal(g[site], a) for g, a in zip(got, alone))
    state = json.loads(json.dumps(both.state()))
    cont = take(both, 3)
    again = take(model_stream(model, tok, [A, B], None, 100, state=state, **kw), 3)
    assert all(torch.equal(x[s], y[s]) for x, y in zip(cont, again) for s in (A, B))
    with pytest.raises(NanosaeError, match="does not belong"):
        model_stream(model, tok, A, None, 100, state=state, **kw)
    mine = take(model_stream(model, tok, [A, B], None, 100, owned=[B], **kw), 3)  # one process: whole batches of B
    assert all(list(m) == [B] and torch.equal(m[B], g[B]) for m, g in zip(mine, got[:3]))


def _dict_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(n, 16, generator=g) + 0.3, B: torch.randn(n, 24, generator=g).relu()}


def test_trainers_that_own_some_sites_equal_one_trainer_of_every_site():
    """What --distribute-sites relies on: each site's dictionaries start and step the same whoever else is trained."""
    saes = [SAETrainConfig(arch="topk", k=4, expansion=4), SAETrainConfig(arch="jumprelu", expansion=2)]
    cfg = TrainConfig(saes=saes, sites=[A, B], tokens=8 * 64, batch_size=64, dead_tokens=128)
    widths = {A: 16, B: 24}
    every = Trainer(cfg, widths)
    parts = [Trainer(cfg, widths, owned=[A]), Trainer(cfg, widths, owned=[B])]
    assert [x.name for x in every.learners] == [f"{s}/{c}" for s in (A, B) for c in ("topk_k4_x4", "jumprelu_l1_x2")]
    for i in range(8):
        batch = _dict_data(64, i)
        for t in (every, *parts):
            t.init(batch) if i == 0 else None
            t.step(batch)
    for a, b in zip(every.learners, parts[0].learners + parts[1].learners):
        assert a.name == b.name
        for (k, va), vb in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
            assert torch.equal(va, vb), (a.name, k)
    fvus = {x.name: x.flush()["fvu"] for x in every.learners}
    assert fvus[f"{A}/topk_k4_x4"] != fvus[f"{B}/topk_k4_x4"]  # each reads its own site's variance


class _Crash:
    """A several-site stream that raises at its n-th batch."""

    def __init__(self, inner, at):
        self.inner, self.at, self.n = inner, at, 0
        self.widths, self.site, self.model_name, self.context_size, self.dataset = inner.widths, "", "m", SEQ, ""

    def state(self):
        return self.inner.state()

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            raise RuntimeError("power cut")
        return next(self.inner)


def test_every_layer_run_resumes_after_a_crash_bitwise(d4, tmp_path):
    model, tok, _ = d4
    sites = expand_sites("resid_post", 4, "all")
    saes = [SAETrainConfig(arch="topk", k=4, expansion=1), SAETrainConfig(arch="batchtopk", k=4, expansion=1)]

    def cfg(out, **kw):
        return TrainConfig(saes=saes, sites=sites, tokens=12 * 64, batch_size=64, log_every=3, out=str(out), **kw)

    def stream(state, crash=0):
        s = model_stream(model, tok, sites, None, 64, seq_len=SEQ, buffer_tokens=4 * SEQ, state=state)
        return _Crash(s, crash) if crash else s

    full = train(cfg(tmp_path / "full"), stream, progress=False)
    assert [s.cfg.hook_name for s in full] == [s for s in sites for _ in saes]
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg(tmp_path / "cut", checkpoint_every=4), lambda st: stream(st, crash=7), progress=False)
    assert read_checkpoint(tmp_path / "cut")["step"] == 4
    train(cfg(tmp_path / "cut", checkpoint_every=4), stream, resume=True, progress=False)
    for site in sites:
        for name in ("topk_k4_x1", "batchtopk_k4_x1"):
            a, b = load_sae(tmp_path / "full" / site / name), load_sae(tmp_path / "cut" / site / name)
            assert a.cfg.hook_name == site and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["sae"] for x in lines[:8]] == [f"{s}/{n}" for s in sites for n in ("topk_k4_x1", "batchtopk_k4_x1")]


def test_cli_trains_and_collects_every_layer(d4, tmp_path, capsys):
    model, tok, _ = d4
    run = tmp_path / "run"
    common = f"--model {BASE_DIR} --seq-len {SEQ}"
    assert (
        main(
            f"train {common} --site blocks.*.resid_post --k 8 --expansion 2 --tokens 2048 --batch-size 512 --out {run}".split()
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trained 4 SAE(s) on 2,048 tokens" in out and "memory: about 0." in out  # stated before it starts
    for i in range(4):
        sae = load_sae(run / f"blocks.{i}.resid_post")  # one recipe: a folder per site
        assert (sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.model_name) == (f"blocks.{i}.resid_post", 128, "nanochat-d4")
    assert main(["train", "--resume", "--out", str(run)]) == 0  # finished: resuming only re-saves
    assert main(["train", "--resume", "--out", str(run), "--layers", "all"]) == 0  # the same sites, given again
    assert main(["train", "--resume", "--out", str(run), "--layers", "0,1"]) == 2
    assert "--layers/--site (saved blocks.0.resid_post" in capsys.readouterr().err

    caches = tmp_path / "caches"
    cmd = f"collect {common} --layers 1,3 --site resid_post,mlp_hidden --tokens 600 --batch-size 4 --out {caches}"
    assert main(cmd.split()) == 0
    got = sorted(p.name for p in caches.iterdir())
    assert got == ["blocks.1.mlp_hidden", "blocks.1.resid_post", "blocks.3.mlp_hidden", "blocks.3.resid_post"]
    one = collect(model, tok, tmp_path / "one", "blocks.3.mlp_hidden", 600, seq_len=SEQ, batch_size=4, progress=False)
    assert load_manifest(caches / "blocks.3.mlp_hidden")["shards"] == one["shards"]  # the same bytes
    capsys.readouterr()
    for argv, message in [
        (f"train {common} --layers all --layer 1 --tokens 2048 --out {tmp_path / 'x'}", "give one of them"),
        (f"train {common} --layers 9 --tokens 2048 --out {tmp_path / 'x'}", "layers 0..3"),
        (f"train --activations {caches / 'blocks.1.resid_post'} --layers all --out {tmp_path / 'x'}", "drop --model"),
        (f"train {common} --layer 1 --distribute-sites --out {tmp_path / 'x'}", "add --layers"),
        (f"train {common} --layers all --max-memory 0.01 --out {tmp_path / 'x'}", "more than --max-memory 0.01;"),
    ]:
        assert main(argv.split()) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err


def test_collect_sites_resumes_each_site_on_its_own(d4, tmp_path, monkeypatch):
    model, tok, _ = d4
    kw = dict(seq_len=SEQ, batch_size=4, shard_tokens=256, progress=False)
    first = collect_sites(model, tok, tmp_path, [A, B], 1000, **kw)
    (tmp_path / B / "shard_00001.safetensors").unlink()
    m = json.loads((tmp_path / B / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / B / "manifest.json").write_text(json.dumps(m))
    forwards, site_acts = [], activations._site_acts
    monkeypatch.setattr(
        activations, "_site_acts", lambda m_, ids, sites: forwards.append(sites) or site_acts(m_, ids, sites)
    )
    again = collect_sites(model, tok, tmp_path, [A, B], 1000, **kw)
    assert again == first and forwards == [[B]]  # one shard (one forward of 4 rows), only at the site that lacks it


DISTRIBUTED = """
import sys

import torch.distributed as dist

from nanosae import load_model
from nanosae.activations import model_stream, ranks_sites
from nanosae.sae import SAETrainConfig
from nanosae.train import TrainConfig, train

sys.path.insert(0, {tests!r})
from test_layers import SITES4, _Crash, _four_site_config

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, tok, _ = load_model({model!r})
crash, resume, distribute = int(sys.argv[1]), sys.argv[2] == "resume", sys.argv[3] == "distribute"
owned = {{"owned": ranks_sites(SITES4, world)[rank]}} if distribute else {{}}


def stream(state):
    s = model_stream(model, tok, SITES4, None, 64, seq_len=64, buffer_tokens=256, rank=rank, world_size=world,
                     state=state, **owned)
    return _Crash(s, crash) if crash else s


try:
    cfg = _four_site_config(sys.argv[4], distribute_sites=distribute)
    train(cfg, stream, resume=resume, progress=False)
except RuntimeError as e:
    print(rank, e)
dist.destroy_process_group()
"""
SITES4 = ["blocks.0.resid_post", "blocks.1.mlp_out", "blocks.2.resid_post", "blocks.3.mlp_hidden"]


def _four_site_config(out, **kw):
    saes = [SAETrainConfig(arch="topk", k=4, expansion=1), SAETrainConfig(arch="batchtopk", k=4, expansion=1)]
    return TrainConfig(
        saes=saes, sites=SITES4, tokens=12 * 64, batch_size=64, log_every=3, checkpoint_every=4, out=str(out), **kw
    )


def test_distribute_sites_on_two_gloo_ranks_equals_one_process_and_resumes_per_rank(d4, tmp_path):
    """Real torchrun, 2 gloo ranks, 4 sites: rank 0 owns the first two sites' dictionaries, rank 1 the others;
    each forwards half of every fill, receives its sites' activations of the whole fill, and steps its own SAEs
    on whole global batches. A crash after the step-4 checkpoints, then a resume from each rank's own checkpoint,
    ends where one process training all 8 SAEs on the same batches ends."""
    model, tok, _ = d4
    one = tmp_path / "one"
    saes = train(
        _four_site_config(one),
        lambda state: model_stream(model, tok, SITES4, None, 64, seq_len=SEQ, buffer_tokens=256, state=state),
        progress=False,
    )
    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED.format(tests=str(Path(__file__).parent), model=str(BASE_DIR)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    two = tmp_path / "two"
    cut = subprocess.run(
        [*run, "7", "new", "distribute", str(two)], env=env, capture_output=True, text=True, timeout=300
    )
    assert cut.returncode == 0 and "power cut" in cut.stdout, cut.stderr[-3000:]
    assert sorted(p.name for p in two.glob("checkpoint-r*.pt")) == ["checkpoint-r0.pt", "checkpoint-r1.pt"]
    r0, r1 = (read_checkpoint(two, f"checkpoint-r{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 4 and len(r0["saes"]) == len(r1["saes"]) == 4  # two sites x two SAEs each
    done = subprocess.run(
        [*run, "0", "resume", "distribute", str(two)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 8 SAE(s)" in done.stdout  # the summary of both ranks' SAEs, printed once
    for sae in saes:
        name = sae.cfg.training["name"]
        got = load_sae(two / sae.cfg.hook_name / name)
        assert got.cfg.hook_name == sae.cfg.hook_name
        for (k, a), b in zip(sae.state_dict().items(), got.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{sae.cfg.hook_name}/{name} {k}")

    def log(run):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x["sae"], round(x["fvu"], 5), round(x["l0"], 3)) for x in lines]

    assert log("one") == log("two") and len(log("one")) == 4 * 8

    # without --distribute-sites the two ranks replicate every SAE and average gradients: data-parallel, equal to
    # one process up to the order of the sums
    ddp = tmp_path / "ddp"
    rep = subprocess.run(
        [*run, "0", "new", "replicated", str(ddp)], env=env, capture_output=True, text=True, timeout=300
    )
    assert rep.returncode == 0 and not list(ddp.glob("checkpoint-r*")), rep.stderr[-3000:]
    for sae in saes:
        got = load_sae(ddp / sae.cfg.hook_name / sae.cfg.training["name"])
        for a, b in zip(sae.state_dict().values(), got.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())
