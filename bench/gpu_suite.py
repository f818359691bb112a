"""The GPU suite: nanosae at nanochat d20 scale on one CUDA device, every number measured in one process.

A nanochat d20-shaped model (current generation: n_embd 1280, 20 layers, 10 heads of 128, vocab 32768, context
2048, random weights in bf16) and, section by section (each measured the way its CPU bench in bench/ does, by the
same functions):
  collect   nanosae.activations.collect at blocks.10.resid_post (bf16 cache) against the forward stopped after
            block 10 alone, median per-round ratio (collect_throughput.compare); goal >= 0.9
  train     TopK and BatchTopK steps of nanosae's Trainer at d_in 1280, d_sae 16384 and 65536, k 32 and 64, batch
            4096 and 16384 (batches already on the device, no dead latents so no AuxK, constant LR): tokens/s, % of
            the bf16 encoder floor, peak memory; sparsify's and SAELens' TopK on the same batches in the same
            process when they import; goals >= 60% of the floor and >= 1.5x sparsify
  eval      nanosae.evaluate.evaluate against three forwards + the SAE (eval_throughput.compare); no goal yet
  features  the feature-statistics pass against forward + encode (features_throughput.compare); goal <= 1.3
  runtime   live tracking while generating: overhead against its FLOP floor (runtime_overhead.compare); goal <= 1.2x

The training floor: the FLOPs that any TopK trainer must spend, the dense encoder matmul that picks the latents
(2 d_in d_sae per token) plus its weight gradient, which is nonzero only at the k active latents (2 d_in k), at the
card's dense bf16 rate measured here by a plain square matmul. nanosae's SAE trainer computes in fp32 (the model's
compute dtype applies to the model, not to the SAE), so its rows are fp32 measured against that bf16 floor; the
fp32 floor (the same matmul in fp32, TF32 as torch's settings leave it) is printed beside it. sparsify computes
its forward under bf16 autocast on CUDA by itself; SAELens runs as its trainer does by default (fp32).

It prints one table, one line per goal (PASS / FAIL / SKIPPED with the measured value) and the time each section
took; --json writes every number. Budget: under 8 minutes on one H100.

    python bench/gpu_suite.py --json gpu.json              # the suite, on the CUDA device
    python bench/gpu_suite.py --only train                 # one section (collect, train, eval, features, runtime)
    python bench/gpu_suite.py --smoke --json smoke.json    # tiny shapes on CPU: every code path in under a minute
    python bench/gpu_suite.py --smoke --device cuda        # the same on the GPU, a quick check before the real run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collect_throughput  # noqa: E402
import eval_throughput  # noqa: E402
import features_throughput  # noqa: E402
import runtime_overhead  # noqa: E402

from nanosae import GPT, GPTConfig, Tokenizer  # noqa: E402
from nanosae.checkpoint import ModelInfo  # noqa: E402
from nanosae.data import token_rows  # noqa: E402
from nanosae.features import FeatureConfig, batch_rows  # noqa: E402
from nanosae.fileio import atomic_write_json  # noqa: E402
from nanosae.sae import SAE, SAEConfig, SAETrainConfig  # noqa: E402
from nanosae.train import TrainConfig, Trainer  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
SECTIONS = ("collect", "train", "eval", "features", "runtime")


@dataclass(frozen=True)
class Dims:
    """The sizes of a run: nanochat d20 by default, SMOKE for the CPU check."""

    n_layer: int = 20
    n_embd: int = 1280
    n_head: int = 10
    vocab: int = 32768
    seq_len: int = 2048
    layer: int = 10  # the SAE site is blocks.<layer>.resid_post
    matmul: int = 8192  # side of the square matmuls that measure the card's peak
    collect_rows: int = 256  # rows of seq_len per round
    collect_batch: int = 16  # rows per forward
    collect_rounds: int = 3
    d_saes: tuple[int, ...] = (16384, 65536)
    ks: tuple[int, ...] = (32, 64)
    batches: tuple[int, ...] = (4096, 16384)
    warm: int = 2  # training steps before the timed ones
    steps: int = 5
    eval_d_sae: int = 16384
    eval_k: int = 64
    eval_tokens: int = 1 << 20
    eval_context: int = 128  # nanosae eval's defaults (SAEBench's context, 16 rows a batch)
    eval_batch: int = 16
    feat_d_sae: int = 16384
    feat_k: int = 32
    feat_tokens: int = 1 << 20
    feat_repeats: int = 2
    run_expansion: int = 16
    run_k: int = 32
    run_prompt: int = 32
    run_tokens: int = 64
    run_rounds: int = 6


SMOKE = Dims(
    n_layer=2, n_embd=64, n_head=2, vocab=2048, seq_len=128, layer=1, matmul=256,
    collect_rows=8, collect_batch=4, collect_rounds=1,
    d_saes=(256, 512), ks=(8,), batches=(128,), warm=1, steps=2,
    eval_d_sae=512, eval_k=16, eval_tokens=4096, eval_batch=4,
    feat_d_sae=512, feat_k=8, feat_tokens=4096, feat_repeats=1,
    run_expansion=4, run_k=8, run_prompt=8, run_tokens=4, run_rounds=1,
)  # fmt: skip


class WideTokenizer(Tokenizer):
    """The test fixture's tokenizer (2000 ids) under a model with nanochat's vocabulary: the data never holds the
    ids it lacks, which show as placeholders where the feature statistics list the vocabulary."""

    def id_to_token(self, i: int) -> str:
        return super().id_to_token(i) if i < self.vocab_size else f"<unused {i}>"


# ---------------------------------------------------------------------------------------------------- helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def fresh_memory(dev: torch.device) -> int:
    """Free what earlier measurements left, restart the peak count; returns the bytes allocated now."""
    gc.collect()
    if dev.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def peak_mib(dev: torch.device, base: int = 0) -> float | None:
    """Peak bytes allocated on the device since fresh_memory, above `base` (None on CPU: no allocator count)."""
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None


def expect_device(dev: torch.device, **things: torch.Tensor | torch.nn.Module) -> None:
    """A CUDA run must never fall back to the CPU (nor a CPU run wander onto a GPU)."""
    for name, x in things.items():
        where = next(x.parameters()).device if isinstance(x, torch.nn.Module) else x.device
        assert where.type == dev.type, f"{name} is on {where}, the suite runs on {dev}"


def random_model(d: Dims, dev: torch.device) -> GPT:
    """A current-generation nanochat GPT of shape d with random weights, built on the device (bf16 on CUDA, as
    nanochat computes there). Every matrix is random: nanochat's init zeroes the output projections."""
    cfg = GPTConfig(
        sequence_len=d.seq_len,
        vocab_size=d.vocab,
        n_layer=d.n_layer,
        n_head=d.n_head,
        n_kv_head=d.n_head,
        n_embd=d.n_embd,
        window_pattern="SSSL",
    )
    with torch.device(dev):
        model = GPT(cfg, "current")
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.size(1) ** -0.5, generator=g)
    if dev.type == "cuda":
        model.set_compute_dtype(torch.bfloat16)
    # a fixed name and fingerprint: the weights are a function of the seed (hashing 2 GB would cost seconds)
    model.info = ModelInfo(f"random-nanochat-d{d.n_layer}", "", 0, None, "current", "seed0")
    model.eval().requires_grad_(False)
    expect_device(dev, model=model)
    return model


def random_sae(d_in: int, d_sae: int, k: int, site: str, dev: torch.device) -> SAE:
    """A TopK SAE with random unit decoder rows and the encoder their transpose (cost depends on shapes, not meaning)."""
    W = F.normalize(torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0)), dim=-1)
    sae = SAE(SAEConfig("topk", d_in, d_sae, k=k, hook_name=site))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
    sae = sae.to(dev).requires_grad_(False)
    expect_device(dev, sae=sae)
    return sae


def rows_of(tok: Tokenizer, seq_len: int, n: int) -> torch.Tensor:
    """n BOS-prefixed token rows of the built-in corpus (the training split, cycled if it runs short)."""
    return torch.tensor(list(itertools.islice(token_rows(tok, None, seq_len, "train", repeat=True), n)))


def peak_tflops(dev: torch.device, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """The card's dense matmul rate (TFLOP/s) in `dtype`: the best of 3 timings of `reps` n x n x n products."""
    g = torch.Generator(dev).manual_seed(0)
    a, b = (torch.randn(n, n, device=dev, generator=g).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: kernels chosen, clocks up
    best = math.inf
    for _ in range(3):
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e12


# ---------------------------------------------------------------------------------------------------- sections


def section_collect(model: GPT, tok: Tokenizer, d: Dims, dev: torch.device) -> dict:
    rows = rows_of(tok, d.seq_len, d.collect_rows).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        r = collect_throughput.compare(
            model, tok, d.layer, rows, d.collect_batch, 1 << 16, "bf16", d.collect_rounds, tmp, verbose=False
        )
    row = table_row("collect", "collect bf16 vs the forward alone", r["collect_pos_s"], r["forward_pos_s"], None)
    return {**r, "rows": [row]}


def timed_steps(step, xs: list[torch.Tensor], warm: int, dev: torch.device) -> float:
    """Tokens/s of step(x) over xs[warm:], after xs[:warm] as warm-up."""
    for x in xs[:warm]:
        step(x)
    sync(dev)
    t = time.perf_counter()
    for x in xs[warm:]:
        step(x)
    sync(dev)
    return sum(len(x) for x in xs[warm:]) / (time.perf_counter() - t)


def nanosae_step(arch: str, d_sae: int, k: int, lr: float, xs: list[torch.Tensor], dev: torch.device):
    sae = SAETrainConfig(arch=arch, d_sae=d_sae, k=k, lr=lr)
    # no latent is dead within the run (AuxK stays off, as in the peers' steady state); constant LR
    cfg = TrainConfig(
        saes=[sae],
        tokens=sum(len(x) for x in xs),
        batch_size=len(xs[0]),
        lr_warmup_steps=0,
        lr_decay_frac=0.0,
        dead_tokens=10**15,
        device=str(dev),
    )
    trainer = Trainer(cfg, xs[0].shape[1])
    trainer.init(xs[0])
    expect_device(dev, weights=trainer.state_dict()["saes"][0]["sae"]["W_dec"])
    return trainer.step


def sparsify_step(sparsify, d_sae: int, k: int, lr: float, xs: list[torch.Tensor], dev: torch.device):
    """sparsify's SparseCoder trained as its Trainer does (fvu loss, parallel decoder gradient removed, Adam,
    unit-norm decoder), with Adam at the same LR."""
    sae = sparsify.SparseCoder(xs[0].shape[1], sparsify.SparseCoderConfig(num_latents=d_sae, k=k), device=dev)
    sae.b_dec.data = xs[0].mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=dev)
    expect_device(dev, sparsify=sae)

    def step(x):
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > 10**15)
        since_fired.add_(len(x))
        since_fired[out.latent_indices.flatten()] = 0
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def saelens_step(sae_lens, d_sae: int, k: int, lr: float, xs: list[torch.Tensor], dev: torch.device):
    """SAELens' TopK training SAE stepped as its SAETrainer does (no autocast by default, clip at 1, Adam)."""
    from sae_lens.saes.sae import TrainStepInput

    cfg = sae_lens.TopKTrainingSAEConfig(d_in=xs[0].shape[1], d_sae=d_sae, k=k, device=str(dev), dtype="float32")
    sae = sae_lens.TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=dev)
    expect_device(dev, saelens=sae)

    def step(x):
        inp = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 10**15, n_training_steps=0, is_logging_step=False
        )
        out = sae.training_forward_pass(step_input=inp)
        with torch.no_grad():
            since_fired.add_(1)
            since_fired[out.feature_acts.bool().sum(0).bool()] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def peers() -> dict[str, object]:
    """The peer packages that import here (each optional), or why not."""
    found = {}
    try:
        import sparsify

        # PyPI's "sparsify" is another project; EleutherAI's is eai-sparsify, also imported as sparsify
        found["sparsify"] = sparsify if hasattr(sparsify, "SparseCoder") else "not EleutherAI's sparsify"
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        found["sparsify"] = f"{type(e).__name__}: {e}"
    try:
        import sae_lens

        found["saelens"] = sae_lens
    except Exception as e:  # noqa: BLE001
        found["saelens"] = f"{type(e).__name__}: {e}"
    return found


def make_step(impl: str, found: dict, d_sae: int, k: int, lr: float, xs: list[torch.Tensor], dev: torch.device):
    if impl in ("topk", "batchtopk"):
        return nanosae_step(impl, d_sae, k, lr, xs, dev)
    return {"sparsify": sparsify_step, "saelens": saelens_step}[impl](found[impl], d_sae, k, lr, xs, dev)


def section_train(d: Dims, dev: torch.device, peak: dict) -> dict:
    found = peers()
    impls = ["topk", "batchtopk"] + [name for name, pkg in found.items() if not isinstance(pkg, str)]
    results = []
    for d_sae, k, batch in itertools.product(d.d_saes, d.ks, d.batches):
        g = torch.Generator(dev).manual_seed(batch)
        xs = [torch.randn(batch, d.n_embd, device=dev, generator=g) + 1.0 for _ in range(d.warm + d.steps)]
        lr = 2e-4 / math.sqrt(d_sae / 2**14)  # nanosae's and sparsify's default for this width
        floor_flops = 2 * d.n_embd * (d_sae + k)  # per token: dense encoder forward + its k-sparse weight gradient
        for impl in impls:
            what = f"{impl} d_sae {d_sae} k {k} B {batch}"
            base = fresh_memory(dev)
            try:
                tok_s = timed_steps(make_step(impl, found, d_sae, k, lr, xs, dev), xs, d.warm, dev)
            except Exception as e:  # noqa: BLE001 - one failure (an OOM, a peer's kernel) must not hide the rest
                error = f"train {what}: {type(e).__name__}: {e}"
                results.append({"impl": impl, "d_sae": d_sae, "k": k, "batch": batch, "error": error})
                print(f"  {what}: FAILED ({error})")
                continue
            results.append(
                {
                    "impl": impl,
                    "d_sae": d_sae,
                    "k": k,
                    "batch": batch,
                    "tok_s": tok_s,
                    "floor_tok_s": peak["bf16_tflops"] * 1e12 / floor_flops,
                    "pct_bf16_floor": 100 * tok_s * floor_flops / (peak["bf16_tflops"] * 1e12),
                    "pct_fp32_floor": 100 * tok_s * floor_flops / (peak["fp32_tflops"] * 1e12),
                    "peak_mib": peak_mib(dev, base),
                }
            )
            r = results[-1]
            mib = "" if r["peak_mib"] is None else f", peak {r['peak_mib']:,.0f} MiB"
            print(f"  {what}: {tok_s:,.0f} tok/s, {r['pct_bf16_floor']:.1f}% of the bf16 floor{mib}")
        del xs
    rows = []
    measured = [r for r in results if "error" not in r]
    sparsify_tok_s = {(r["d_sae"], r["k"], r["batch"]): r["tok_s"] for r in measured if r["impl"] == "sparsify"}
    for r in measured:
        ref = sparsify_tok_s.get((r["d_sae"], r["k"], r["batch"]))
        note = f"{r['pct_fp32_floor']:.0f}% of the fp32 floor"
        if ref and r["impl"] in ("topk", "batchtopk"):
            r["x_sparsify"] = r["tok_s"] / ref
            note += f", {r['x_sparsify']:.2f}x sparsify"
        label = f"nanosae {r['impl']}" if r["impl"] in ("topk", "batchtopk") else f"{r['impl']} topk"
        case = f"{label} d_sae {r['d_sae']} k {r['k']} B {r['batch']}"
        rows.append(table_row("train", case, r["tok_s"], r["floor_tok_s"], r["peak_mib"], note))
    skipped = {name: why for name, why in found.items() if isinstance(why, str)}
    return {"results": results, "peers_skipped": skipped, "rows": rows}


def section_eval(model: GPT, tok: Tokenizer, d: Dims, dev: torch.device) -> dict:
    site = f"blocks.{d.layer}.resid_post"
    sae = random_sae(d.n_embd, d.eval_d_sae, d.eval_k, site, dev)
    n_rows = math.ceil(d.eval_tokens / (d.eval_batch * d.eval_context)) * d.eval_batch
    rows = rows_of(tok, d.eval_context, n_rows)
    fresh_memory(dev)
    r = eval_throughput.compare(model, tok, sae, site, rows, rows.numel() // 10, d.eval_batch, progress=False)
    n = rows.numel()
    out = {
        "tokens": n,
        "floor_s": r["floor_s"],
        "eval_s": r["eval_s"],
        "ratio": r["floor_s"] / r["eval_s"],
        "floor_mib": r["floor_mib"] if dev.type == "cuda" else None,
        "eval_mib": r["eval_mib"] if dev.type == "cuda" else None,
    }
    case = f"eval d_sae {d.eval_d_sae} k {d.eval_k}, {n:,} tokens (CE/KL on 10%)"
    out["rows"] = [table_row("eval", case, n / r["eval_s"], n / r["floor_s"], out["eval_mib"])]
    return out


def section_features(model: GPT, tok: Tokenizer, d: Dims, dev: torch.device) -> dict:
    site = f"blocks.{d.layer}.resid_post"
    sae = random_sae(d.n_embd, d.feat_d_sae, d.feat_k, site, dev)
    cfg = FeatureConfig(n_tokens=d.feat_tokens)
    rows = rows_of(tok, cfg.seq_len, d.feat_tokens // cfg.seq_len)
    batches = list(rows.split(batch_rows(cfg, d.feat_d_sae)))
    fresh_memory(dev)
    r = features_throughput.compare(model, tok, sae, site, batches, cfg, d.feat_repeats)
    n = rows.numel()
    pass_s = r["pass_s"] - r["weights_s"]
    out = {**r, "tokens": n, "ratio": pass_s / r["base_s"], "peak_mib": peak_mib(dev)}
    case = f"feature pass d_sae {d.feat_d_sae} k {d.feat_k}, {n:,} tokens"
    note = f"+{r['weights_s']:.1f} s of weight-only statistics"
    out["rows"] = [table_row("features", case, n / pass_s, n / r["base_s"], out["peak_mib"], note)]
    return out


def section_runtime(model: GPT, tok: Tokenizer, d: Dims, dev: torch.device) -> dict:
    site = f"blocks.{d.layer}.resid_post"
    sae = random_sae(d.n_embd, d.run_expansion * d.n_embd, d.run_k, site, dev)
    prompt = rows_of(tok, d.run_prompt, 1)[0].tolist()
    r = runtime_overhead.compare(model, sae, prompt, d.run_tokens, d.run_rounds, top_n=8, verbose=False)
    out = {**r, "ratio_to_floor": r["overhead"] / r["floor"]}
    n = d.run_tokens
    floor_tok_s = n / (r["plain_s"] * (1 + r["floor"]))  # plain generation slowed by exactly the floor
    case = f"tracked generation, SAE {d.run_expansion}x k {d.run_k}, top 8 to the host"
    note = f"overhead {r['overhead']:.1%}, floor {r['floor']:.1%}"
    out["rows"] = [table_row("runtime", case, n / r["tracked_s"], floor_tok_s, None, note)]
    return out


# ---------------------------------------------------------------------------------------------------- report


def table_row(section: str, case: str, tok_s: float, floor_tok_s: float, mib: float | None, note: str = "") -> dict:
    return {
        "section": section,
        "case": case,
        "tok_s": tok_s,
        "floor_tok_s": floor_tok_s,
        "pct_floor": 100 * tok_s / floor_tok_s,
        "peak_mib": mib,
        "note": note,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'section':9s} {'case':58s} {'tok/s':>12s} {'floor tok/s':>12s} {'% floor':>8s} {'peak MiB':>9s}  note"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        mib = "" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        print(
            f"{r['section']:9s} {r['case']:58s} {r['tok_s']:12,.0f} {r['floor_tok_s']:12,.0f} "
            f"{r['pct_floor']:7.1f}% {mib:>9s}  {r['note']}"
        )


def goal(res: dict, section: str, name: str, value, op: str, target: float, fmt: str, note="", impls=()) -> dict:
    """PASS or FAIL by the value against the target; FAIL whenever a measurement it rests on crashed; SKIPPED
    without a value (the section not run, or a peer package missing)."""
    errors = failures(res, section, impls)
    if section not in res:
        value, note = None, "section not run"
    if errors:
        status, note = "FAIL", f"{len(errors)} failed: {errors[0]}"
    elif value is None:
        status = "SKIPPED"
    else:
        status = "PASS" if (value >= target if op == ">=" else value <= target) else "FAIL"
        note = f"{fmt.format(value)} (goal {op} {fmt.format(target)})" + (f"; {note}" if note else "")
    return {"goal": name, "status": status, "value": value, "op": op, "target": target, "why": note}


def goals(res: dict) -> list[dict]:
    """One line per goal: the measured value (the worst case where a section measures several) and the target."""
    train = [r for r in res.get("train", {}).get("results", []) if "error" not in r]
    ours = [r for r in train if r["impl"] in ("topk", "batchtopk")]
    low = min(ours, key=lambda r: r["pct_bf16_floor"], default=None)
    slow = min(
        (r for r in ours if r["impl"] == "topk" and "x_sparsify" in r), key=lambda r: r["x_sparsify"], default=None
    )
    no_sparsify = res.get("train", {}).get("peers_skipped", {}).get("sparsify", "")

    def get(section: str, key: str):
        return res.get(section, {}).get(key)

    def worst(r: dict) -> str:
        return f"worst: {r['impl']} d_sae {r['d_sae']} k {r['k']} B {r['batch']}"

    return [
        goal(res, "collect", "collect / truncated forward", get("collect", "ratio"), ">=", 0.9, "{:.3f}"),
        goal(res, "train", "training / bf16 encoder floor", low and low["pct_bf16_floor"], ">=", 60, "{:.1f}%",
             worst(low) + ", fp32 trainer" if low else "", ("topk", "batchtopk")),
        goal(res, "train", "TopK training / sparsify TopK", slow and slow["x_sparsify"], ">=", 1.5, "{:.2f}x",
             worst(slow) if slow else no_sparsify, ("topk", "sparsify")),
        goal(res, "features", "feature pass / (forward + encode)", get("features", "ratio"), "<=", 1.3, "{:.3f}"),
        goal(res, "runtime", "tracking overhead / its FLOP floor", get("runtime", "ratio_to_floor"), "<=", 1.2,
             "{:.2f}x"),
    ]  # fmt: skip


def failures(res: dict, section: str, impls=()) -> list[str]:
    """The errors of a section (of its measurements of `impls` only, where given)."""
    sec = res.get(section, {})
    found = [r["error"] for r in sec.get("results", []) if "error" in r and (not impls or r["impl"] in impls)]
    return sec.get("errors", []) + found


def finite(obj):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------- main


def pick_device(smoke: bool, asked: str | None) -> torch.device:
    """The device named (default: CUDA, or the CPU for --smoke), refused where it cannot serve: a full run on the
    CPU, or CUDA where there is none (never a silent fall back)."""
    dev = torch.device(asked or ("cpu" if smoke else "cuda"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"gpu_suite: no CUDA device (torch {torch.__version__}); run with --smoke on a CPU")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if not smoke:
        sys.exit(f"gpu_suite: the full suite runs on a CUDA device, not {dev}; use --smoke for the small CPU form")
    return dev


def run_sections(sections: list[str], d: Dims, dev: torch.device, res: dict) -> None:
    """Each section into res[section], timed; a section that raises records its error and the next one runs."""
    model = tok = None
    for section in sections:
        t = time.perf_counter()
        try:
            if section == "train":
                res[section] = section_train(d, dev, res["peak"])
            else:
                if model is None:
                    tok = WideTokenizer(Tokenizer.from_dir(FIXTURE / "tokenizer").enc)
                    model = random_model(d, dev)
                fn = {"collect": section_collect, "eval": section_eval, "features": section_features}
                res[section] = fn.get(section, section_runtime)(model, tok, d, dev)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' numbers
            traceback.print_exc()
            res[section] = {"rows": [], "errors": [f"{section}: {type(e).__name__}: {e}"]}
        res["seconds"][section] = time.perf_counter() - t
        print(f"[{section}: {res['seconds'][section]:.1f} s]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU by default): every code path, < 1 minute")
    ap.add_argument("--device", default=None, help="default: cuda (the suite), cpu (--smoke)")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    ap.add_argument("--json", default=None, help="write every number to this file")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, even through a pipe
    d = SMOKE if args.smoke else Dims()
    dev = pick_device(args.smoke, args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    print(f"gpu_suite{' --smoke' if args.smoke else ''} on {name}, torch {torch.__version__}")

    t_start = time.perf_counter()
    res: dict = {
        "device": name,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "dims": dataclasses.asdict(d),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "seconds": {},
    }
    res["peak"] = {
        "bf16_tflops": peak_tflops(dev, d.matmul, torch.bfloat16),
        "fp32_tflops": peak_tflops(dev, d.matmul, torch.float32),
    }
    print(f"peak dense matmul: bf16 {res['peak']['bf16_tflops']:.1f} TFLOP/s, fp32 {res['peak']['fp32_tflops']:.1f}")
    run_sections(args.only or list(SECTIONS), d, dev, res)
    res["seconds"]["total"] = time.perf_counter() - t_start

    print()
    print_table([row for s in SECTIONS if s in res for row in res[s]["rows"]])
    res["goals"] = goals(res)
    print()
    for g in res["goals"]:
        print(f"{g['status']:7s} {g['goal']}: {g['why']}")
    errors = [err for s in SECTIONS for err in failures(res, s)]
    for err in errors:
        print(f"error: {err}")
    times = ", ".join(f"{s} {res['seconds'][s]:.0f}" for s in SECTIONS if s in res["seconds"])
    print(f"\ntotal {res['seconds']['total']:.0f} s ({times})")
    if args.json:
        atomic_write_json(args.json, finite(res))
        print(f"numbers: {args.json}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
