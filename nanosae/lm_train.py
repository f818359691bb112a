"""The tiny nanochat-architecture model that makes nanosae work from nothing: train it on CPU, save it in
nanochat's own layout, cache it.

`ensure_tiny_model()` returns a nanochat base dir ($NANOSAE_HOME/tiny/<config hash>/) holding
tokenizer/{tokenizer.pkl, token_bytes.pt} and base_checkpoints/d<L>/{model,meta}_<step>.pt/json, training it
first (tokenizer with rustbpe, then the model) unless that config was trained before. The whole result is
built in a temp folder and renamed into place after its marker file is written, so a killed run never leaves a
folder that looks complete.

The recipe follows nanochat's base_train: current-generation GPT with its init, Muon for the block matrices,
AdamW for embeddings, unembedding and scalars (the (un)embedding rates scaled by (n_embd/768)^-0.5 like
nanochat), warmup then linear warmdown, rows of seq_len+1 BOS-prefixed tokens, val bits-per-byte from
token_bytes. The defaults and learning rates come from a sweep of val bpb at fixed token budgets, picked for
the most quality per CPU-second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import PHASE_DIRS, load_model, model_fingerprint, resolve, save_checkpoint
from .errors import NanosaeError
from .fileio import atomic_write_json, pid_alive, sha256_file, verify_sha256
from .generate import generate
from .gpt import GPT, GPTConfig
from .tokenizer import Tokenizer

MARKER = "train_lm.json"  # written last: its presence means the folder is complete
RECIPE = 1  # bump when a code change alters what a config trains to, so older caches are not reused
# no trailing spaces: the tokenizer attaches a space to the word after it, so "The " would end on a rare token
BUILTIN_PROMPTS = ("def", "class", "import", "The")


@dataclass
class TinyConfig:
    """Everything that determines the trained model (the cache key hashes all of it plus the data's identity)."""

    data: str | None = None  # None/"builtin" (stdlib sources + pydoc topics), or a file/dir (see data.py)
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 192
    head_dim: int = 64
    seq_len: int = 256
    window_pattern: str = "L"
    batch_size: int = 8  # rows of seq_len tokens per step
    steps: int = 600
    matrix_lr: float = 0.08  # Muon
    embedding_lr: float = 1.0  # AdamW; these two are scaled by (n_embd/768)^-0.5 like nanochat
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.5
    weight_decay: float = 0.0  # Muon matrices only
    warmup_steps: int = 20
    warmdown_ratio: float = 0.5  # final fraction of steps over which the lr decays linearly
    final_lr_frac: float = 0.1
    eval_every: int = 250
    save_every: int = 100  # also keep model_<step>.pt every this many steps (0: the final one only)
    eval_tokens: int = 32768
    tokenizer_chars: int = 20_000_000  # text fed to BPE training at most (each document capped at 10k chars)
    compute: str = "auto"  # float32 | bfloat16 (autocast) | auto: bf16 where this CPU runs it faster
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data == "builtin":
            self.data = None
        elif self.data is not None:  # absolute, so the cache key does not depend on the working directory
            self.data = str(Path(self.data).expanduser().resolve())

    def validate(self) -> None:
        if self.head_dim % 2 or self.n_embd % self.head_dim:
            raise NanosaeError(f"n_embd {self.n_embd} must be a multiple of head_dim {self.head_dim}, which is even")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise NanosaeError(f"window_pattern {self.window_pattern!r} may only hold S and L (e.g. L or SSSL)")
        if self.vocab_size < 256 + 9 or self.vocab_size > 65536:
            raise NanosaeError("vocab_size must be between 265 (bytes + 9 specials) and 65536")
        if min(self.n_layer, self.seq_len - 1, self.batch_size, self.steps) < 1:
            raise NanosaeError("n_layer, batch_size and steps must be positive and seq_len at least 2")
        if self.save_every < 0:
            raise NanosaeError(f"save_every {self.save_every}: use 0 (final checkpoint only) or a step interval")
        if self.compute not in ("auto", "float32", "bfloat16"):
            raise NanosaeError(f"compute {self.compute!r}: choose auto, float32 or bfloat16")

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(
            sequence_len=self.seq_len,
            vocab_size=self.vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_embd // self.head_dim,
            n_kv_head=self.n_embd // self.head_dim,
            n_embd=self.n_embd,
            window_pattern=self.window_pattern,
        )


def nanosae_home() -> Path:
    return Path(os.environ.get("NANOSAE_HOME") or "~/.cache/nanosae").expanduser()


def config_hash(cfg: TinyConfig) -> str:
    """The cache key: everything that determines the final model. save_every is left out (writing checkpoints
    on the way changes nothing in training), so a run with a series also serves a request for fewer steps."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "save_every"}
    key = {"recipe": RECIPE, "config": config, "data": data.source_fingerprint(cfg.data)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def series_steps(cfg: TinyConfig) -> list[int]:
    """The steps whose checkpoints a run writes: every save_every steps, and the last."""
    every = cfg.save_every or cfg.steps
    return [*range(every, cfg.steps, every), cfg.steps]


# ---------------------------------------------------------------------------------------------- optimisers


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (a batch of matrices) by a quintic Newton-Schulz iteration tuned to
    push all singular values near 1 fast (Muon's coefficients); exactness is not needed, speed is."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update for each matrix is orthogonalised, so every direction of a weight
    matrix moves at the same rate (Keller Jordan's Muon, as nanochat uses for its block matrices). Matrices of
    one shape are orthogonalised as one batch. `ns_dtype` bf16 runs the iteration in bf16 (fast with AMX)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            m, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for (rows, cols), ps in by_shape.items():
                grads = torch.stack([p.grad for p in ps])
                state = self.state[ps[0]]  # the momentum of a same-shape set lives with its first member
                buf = state.get("momentum")
                if buf is None or buf.shape != grads.shape:
                    buf = state["momentum"] = torch.zeros_like(grads)
                buf.lerp_(grads, 1 - m)
                update = orthogonalize(grads.lerp_(buf, m).to(self.ns_dtype)).float()
                update *= max(1.0, rows / cols) ** 0.5
                for p, u in zip(ps, update):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(u, alpha=-lr)


def make_optimizers(model: GPT, cfg: TinyConfig, lr_scale: float = 1.0) -> tuple[torch.optim.AdamW, Muon]:
    """nanochat's split: Muon for every matrix inside the blocks, AdamW (betas 0.8/0.95) for the rest; every
    learning rate times lr_scale."""
    scale = (cfg.n_embd / 768) ** -0.5
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    embeddings = [model.transformer.wte.weight, *model.value_embeds.parameters()]
    scalars = [model.x0_lambdas, model.smear_lambda, model.backout_lambda, model.smear_gate.weight]
    groups = [
        dict(params=embeddings, lr=cfg.embedding_lr * scale),
        dict(params=[model.lm_head.weight], lr=cfg.unembedding_lr * scale),
        dict(params=scalars, lr=cfg.scalar_lr),
        # resid_lambdas scale the whole stream: a small step there moves every layer
        dict(params=[model.resid_lambdas], lr=cfg.scalar_lr * 0.01),
    ]
    n = sum(len(g["params"]) for g in groups) + len(matrices)
    if n != len(list(model.parameters())):
        raise RuntimeError("make_optimizers missed a parameter; update it for this GPT")
    adam = torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    muon = Muon(matrices, lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["lr"] *= lr_scale
            g["initial_lr"] = g["lr"]
    return adam, muon


def lr_multiplier(step: int, cfg: TinyConfig | SFTConfig) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac over the last warmdown_ratio of the steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown = round(cfg.warmdown_ratio * cfg.steps)
    left = cfg.steps - step
    if left >= warmdown:
        return 1.0
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * left / warmdown


# ---------------------------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(
    model: GPT, inputs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """(mean loss in nats per target, bits per byte) over the targets that are not -1 (all of them in base
    training, the assistant's tokens in SFT). Like nanochat, bpb counts only targets that are real text
    (token_bytes > 0), so special tokens neither add loss nor bytes."""
    nats = total_bytes = tokens = loss_sum = 0.0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size].flatten()
        loss = F.cross_entropy(model(x).flatten(0, 1), y, ignore_index=-1, reduction="none")
        nb = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss * (nb > 0)).sum().item()
        total_bytes += nb.sum().item()
        loss_sum += loss.sum().item()
        tokens += (y >= 0).sum().item()
    return loss_sum / tokens, nats / (math.log(2) * total_bytes)


def load_rows(tok: Tokenizer, cfg: TinyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train rows (shuffled once by the seed) and val rows, each seq_len+1 tokens starting with BOS. The train
    rows are the whole source, or 8x what training consumes from a large one (its start, in order: sources
    sorted by topic, like the built-in corpus, must be read whole to be shuffled well; nanochat's shards come
    shuffled already)."""
    T = cfg.seq_len + 1
    train = data.token_tensor(tok, cfg.data, T, "train", max_rows=8 * cfg.steps * cfg.batch_size)
    val = data.token_tensor(tok, cfg.data, T, "val", max_rows=max(1, cfg.eval_tokens // cfg.seq_len))
    where = cfg.data or "the built-in corpus"
    if len(train) < cfg.batch_size:
        raise NanosaeError(
            f"{where} gives only {len(train)} train rows of {T} tokens, fewer than batch_size {cfg.batch_size}; "
            "use more text or a smaller --seq-len/--batch-size"
        )
    if len(val) == 0:
        raise NanosaeError(f"{where} gives no validation row of {T} tokens; use more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(cfg.seed)
    return train[torch.randperm(len(train), generator=g)], val


def _tokenizer_texts(cfg: TinyConfig) -> Iterator[str]:
    """nanochat's tok_train feed: documents capped at 10k chars, up to tokenizer_chars in all."""
    left = cfg.tokenizer_chars
    for doc in data.iter_documents(cfg.data, "train"):
        doc = doc[:10_000]
        yield doc
        left -= len(doc)
        if left <= 0:
            return


class SpeedProbe:
    """Picks the fastest (threads, compute dtype) for this machine by timing real training steps, then keeps it.
    Both swing a lot and cannot be known in advance (measured on a 2-core Xeon): bf16 autocast runs 1.5-2x faster
    where the CPU has AMX and several times slower where it lacks bf16 units, and on a CPU shared with other
    processes, OpenMP threads waiting for each other made 2 threads 3-20x slower than 1. So: the dtypes are
    compared on 1 thread (stable even on a busy machine), then the winner on all threads. Each setting runs a block
    of steps whose first is not counted (thread pools and caches settle)."""

    def __init__(self, cfg: TinyConfig | SFTConfig, device: str, first: int = 2, block: int = 3):
        self.n = torch.get_num_threads()
        self.cpu = torch.device(device).type == "cpu"
        if cfg.compute != "auto":
            dtypes = [getattr(torch, cfg.compute)]
        else:
            dtypes = [torch.bfloat16, torch.float32] if self.cpu else [torch.float32]
        self.plan = [(1, d) for d in dtypes] if self.cpu and len(dtypes) > 1 else []
        if not self.plan and self.cpu and self.n > 1:
            self.plan = [(1, dtypes[0]), (self.n, dtypes[0])]
        self.times: dict[tuple, list[float]] = {}
        self.first, self.block = first, block
        self.choice = self.current = (self.n, dtypes[0])

    def _trial(self, step: int) -> int | None:
        i = (step - self.first) // self.block
        return i if step >= self.first and i < len(self.plan) else None

    def setting(self, step: int) -> torch.dtype:
        """Set the thread count for this step and return its compute dtype."""
        i = self._trial(step)
        self.current = self.choice if i is None else self.plan[i]
        torch.set_num_threads(self.current[0])
        return self.current[1]

    def record(self, step: int, seconds: float) -> str | None:
        """Note a step's time; after the last trial, settle and return a line saying what was chosen."""
        i = self._trial(step)
        if i is None:
            return None
        if (step - self.first) % self.block:
            self.times.setdefault(self.current, []).append(seconds)
        if (step - self.first) % self.block < self.block - 1:
            return None
        med = {o: statistics.median(t) for o, t in self.times.items()}
        self.choice = min(med, key=med.get)
        if i == len(self.plan) - 1 and self.n > 1 and (self.n, self.choice[1]) not in med:
            self.plan.append((self.n, self.choice[1]))  # the best dtype, now on all threads
            return None
        if i < len(self.plan) - 1:
            return None
        tried = ", ".join(f"{1000 * m:.0f} ms on {t} thread(s) in {_name(d)}" for (t, d), m in med.items())
        return f"fastest: {self.choice[0]} thread(s), {_name(self.choice[1])} (a step took {tried})"

    def restore(self) -> None:
        torch.set_num_threads(self.n)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def optimize(
    model: GPT,
    opt_cfg: TinyConfig,
    run: TinyConfig | SFTConfig,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    at_step: Callable[[int, float], None],
    desc: str,
    lr_scale: float = 1.0,
    device: str = "cpu",
) -> tuple[float, float, SpeedProbe]:
    """The training loop both phases share: run.steps optimizer steps on (inputs, targets) batches (targets -1
    are not trained), with opt_cfg's optimizers and learning rates times lr_scale, run's schedule and compute
    dtype. at_step(step, smoothed train loss) runs after every step > 0 that is about to start and after the
    last one (for evaluations and checkpoints). Returns (smoothed train loss, seconds, the speed probe)."""
    adam, muon = make_optimizers(model, opt_cfg, lr_scale)
    probe = SpeedProbe(run, device)
    bar = tqdm(range(run.steps), desc=desc, unit="step", dynamic_ncols=True)
    smooth, ema = float("nan"), 0.0
    t0 = time.perf_counter()
    model.train()
    try:
        for step in bar:
            if step > 0:
                at_step(step, smooth)
            x, y = next_batch()
            t = time.perf_counter()
            muon.ns_dtype = dtype = probe.setting(step)
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(x, y)
            loss.backward()
            for opt in (adam, muon):
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_multiplier(step, run)
                opt.step()
            model.zero_grad(set_to_none=True)
            ema = 0.9 * ema + 0.1 * loss.item()  # nanochat's debiased EMA of the train loss
            smooth = ema / (1 - 0.9 ** (step + 1))
            bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
            if note := probe.record(step, time.perf_counter() - t):
                bar.write(note)
        bar.close()
        seconds = time.perf_counter() - t0
        model.eval()  # in fp32, as nanosae.load_model runs the checkpoint
        at_step(run.steps, smooth)
    finally:
        bar.close()
        probe.restore()
    return smooth, seconds, probe


def fit(
    cfg: TinyConfig,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    token_bytes: torch.Tensor,
    device: str = "cpu",
    save: Callable[[int, GPT, list[dict], int], None] | None = None,
) -> tuple[GPT, dict]:
    """A fresh current-generation GPT trained for cfg.steps on rows of seq_len+1 tokens, with val loss/bpb every
    eval_every steps, at every checkpoint of the series and at the end; save(step, model, val history, epoch)
    writes the series' checkpoints before the last. Returns (model, stats)."""
    torch.manual_seed(cfg.seed)
    # like nanochat's base_train, the vocab is the tokenizer's (BPE on little text can stop short of the target)
    model = GPT(dataclasses.replace(cfg.gpt_config(), vocab_size=len(token_bytes)), "current")
    model.init_weights(seed=cfg.seed)
    model.to(device)
    train_rows, val_rows, token_bytes = train_rows.to(device), val_rows.to(device), token_bytes.to(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(
        f"model: nanochat d{cfg.n_layer}, n_embd {cfg.n_embd}, {model.num_params() / 1e6:.2f}M params, "
        f"seq_len {cfg.seq_len}; {cfg.steps} steps x {tokens_per_step} tokens = "
        f"{cfg.steps * tokens_per_step / 1e6:.2f}M tokens ({cfg.steps * tokens_per_step / train_rows.numel():.2f} "
        "epochs)" + (f"; a checkpoint every {cfg.save_every} steps" if cfg.save_every else "")
    )
    history: list[dict] = []
    state = {"pos": 0, "epoch": 0, "rows": train_rows}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    saves = set(series_steps(cfg))

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["pos"] + cfg.batch_size > len(state["rows"]):  # next epoch: a fresh order
            state["pos"], state["epoch"] = 0, state["epoch"] + 1
            state["rows"] = state["rows"][torch.randperm(len(state["rows"]), generator=g).to(device)]
        batch = state["rows"][state["pos"] : state["pos"] + cfg.batch_size]
        state["pos"] += cfg.batch_size
        return batch[:, :-1], batch[:, 1:]

    def at_step(step: int, smooth: float) -> None:
        if step % cfg.eval_every and step not in saves:
            return
        was_training = model.training
        model.eval()
        loss, bpb = evaluate(model, val_rows[:, :-1], val_rows[:, 1:], token_bytes, cfg.batch_size)
        model.train(was_training)
        history.append({"step": step, "val_loss": loss, "val_bpb": bpb, "train_loss": smooth})
        tqdm.write(f"step {step:5d}/{cfg.steps} | train loss {smooth:.3f} | val loss {loss:.3f} | val bpb {bpb:.3f}")
        if save is not None and step in saves and step < cfg.steps:
            save(step, model, history, state["epoch"])

    smooth, seconds, probe = optimize(model, cfg, cfg, next_batch, at_step, "train-lm", device=device)
    tokens = cfg.steps * tokens_per_step
    stats = {
        "compute": _name(probe.choice[1]),
        "threads": probe.choice[0],
        "params": model.num_params(),
        "train_tokens": tokens,
        "train_loss": smooth,
        "val_loss": history[-1]["val_loss"],
        "val_bpb": history[-1]["val_bpb"],
        "min_val_bpb": min(h["val_bpb"] for h in history),
        "epoch": state["epoch"],
        "history": history,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "gflops": 3 * model.flops_per_token() * tokens / seconds / 1e9,
    }
    return model, stats


def _base_meta(cfg: TinyConfig, history: list[dict], seconds: float, epoch: int) -> dict:
    """nanochat's meta_*.json keys (base_train) for a checkpoint taken at the last step of the val history."""
    return {
        "val_bpb": history[-1]["val_bpb"],
        "user_config": dataclasses.asdict(cfg),
        "device_batch_size": cfg.batch_size,
        "max_seq_len": cfg.seq_len,
        "total_batch_size": cfg.batch_size * cfg.seq_len,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 0, "epoch": epoch + 1},
        "loop_state": {
            "min_val_bpb": min(h["val_bpb"] for h in history),
            "smooth_train_loss": history[-1]["train_loss"],
            "total_training_time": seconds,
        },
    }


def train(cfg: TinyConfig, out_dir: str | os.PathLike) -> dict:
    """Train a tokenizer and a model for cfg, write them into out_dir as a nanochat base dir (with the series of
    checkpoints save_every asks for), and return the run's summary (also written to out_dir/train_lm.json,
    last)."""
    cfg.validate()
    out = Path(out_dir)
    ckpt_dir = out / "base_checkpoints" / f"d{cfg.n_layer}"
    t0 = time.perf_counter()
    tok = Tokenizer.train(_tokenizer_texts(cfg), cfg.vocab_size)
    tok.save(out / "tokenizer")
    token_bytes = tok.token_byte_lengths()
    t_tok = time.perf_counter() - t0
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: BPE found only {tok.vocab_size - 265} merges in this text: the vocab is {tok.vocab_size}")
    train_rows, val_rows = load_rows(tok, cfg)
    t_data = time.perf_counter() - t0 - t_tok
    print(
        f"tokenizer: {tok.vocab_size} tokens trained in {t_tok:.1f}s; data: {train_rows.numel() / 1e6:.2f}M train "
        f"tokens, {val_rows.numel() / 1e3:.0f}k val tokens ({t_data:.1f}s)"
    )
    started = time.perf_counter()

    def save(step: int, model: GPT, history: list[dict], epoch: int) -> None:
        save_checkpoint(ckpt_dir, step, model, _base_meta(cfg, history, time.perf_counter() - started, epoch))

    model, stats = fit(cfg, train_rows, val_rows, token_bytes, save=save)
    save_checkpoint(
        ckpt_dir, cfg.steps, model, _base_meta(cfg, stats["history"], stats["train_seconds"], stats["epoch"])
    )
    summary = {
        "hash": config_hash(cfg),
        "recipe": RECIPE,
        "config": dataclasses.asdict(cfg),
        "checkpoints": series_steps(cfg),
        **stats,
        "seconds": {"tokenizer": t_tok, "data": t_data, "train": stats["train_seconds"]},
    }
    summary["seconds"]["total"] = time.perf_counter() - t0
    summary["sha256"] = file_digests(out)
    print(
        f"trained in {stats['train_seconds']:.0f}s ({stats['tokens_per_second']:.0f} tok/s, "
        f"{stats['gflops']:.0f} GFLOP/s of matmuls): train loss {stats['train_loss']:.3f}, "
        f"val loss {stats['val_loss']:.3f}, val bpb {stats['val_bpb']:.3f}"
    )
    atomic_write_json(out / MARKER, summary)
    return summary


# ---------------------------------------------------------------------------------------------- cache


def read_marker(base_dir: Path) -> dict | None:
    try:
        return json.loads((base_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of every file in a finished folder, recorded in its marker so that a reuse can check that none
    was damaged since."""
    return {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def _verify(folder: Path, marker: dict, marker_name: str = MARKER) -> None:
    """Check every file against the sha256 the marker recorded when the folder was complete."""
    remedy = f"nothing was changed: delete {folder} to train it again"
    if not marker.get("sha256"):
        raise NanosaeError(f"{folder / marker_name}: records no checksums (an older nanosae wrote it); {remedy}")
    for name, digest in marker["sha256"].items():
        verify_sha256(folder / name, remedy, expected=digest)


def tiny_dir(cfg: TinyConfig | None = None) -> Path:
    """Where the tiny model for cfg (default TinyConfig()) is cached, trained or not: $NANOSAE_HOME/tiny/<hash>."""
    return nanosae_home() / "tiny" / config_hash(cfg or TinyConfig())


def publish(target: Path, build: Callable[[Path], object], finished: Callable[[Path], bool]) -> None:
    """Run build(tmp) in a temp folder beside target, then rename it into place (replacing target, which the
    caller has checked is an older result of its own or empty), so a killed run never leaves a folder that looks
    complete. Temp folders left by dead processes are cleared first. finished(target) says whether another
    process published the same result first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed runs
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not finished(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_model(cfg: TinyConfig | None = None, out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The nanochat base dir of the tiny model for cfg (default TinyConfig()), trained now unless it is cached
    ($NANOSAE_HOME/tiny/<hash>, or `out` when given) with every checkpoint cfg.save_every asks for. `force`
    retrains. Load it with nanosae.load_model(path) (a step of the series: load_model(path, step))."""
    cfg = cfg or TinyConfig()
    cfg.validate()
    h = config_hash(cfg)
    target = Path(out).expanduser() if out is not None else tiny_dir(cfg)
    marker = read_marker(target) if target.exists() else None
    if marker is not None and marker.get("hash") == h and not force:
        missing = sorted(set(series_steps(cfg)) - set(marker.get("checkpoints") or [cfg.steps]))
        if not missing:
            _verify(target, marker)
            print(f"reusing the tiny model trained before at {target} (val bpb {marker['val_bpb']:.3f})")
            return target
        print(
            f"the tiny model at {target} was trained without checkpoints at steps {', '.join(map(str, missing))}; "
            "training it again to write them (this replaces it, and any chat model beside it)"
        )
    if target.exists() and any(target.iterdir()) and marker is None:
        raise NanosaeError(f"{target}: exists and is not a train-lm result; choose an empty or new directory")
    print(f"training the tiny model (config {h}) into {target}")
    publish(target, lambda tmp: train(cfg, tmp), lambda t: (read_marker(t) or {}).get("hash") == h)
    return target


def sample_prompts(cfg: TinyConfig, n: int = 4) -> list[str]:
    """Fixed code/English openings for the built-in corpus; the first words of val documents otherwise."""
    if cfg.data is None:
        return list(BUILTIN_PROMPTS[:n])
    prompts = []
    for doc in data.iter_documents(cfg.data, "val"):
        if words := doc.split()[:3]:
            prompts.append(" ".join(words))
        if len(prompts) == n:
            break
    return prompts or ["The"]


def samples(
    base_dir: str | os.PathLike,
    prompts: list[str] | None = None,
    max_tokens: int = 48,
    temperature: float = 0.7,
    top_k: int = 40,
) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from the saved checkpoint (so they also prove that it loads); seeded."""
    model, tok, meta = load_model(base_dir)
    cfg = TinyConfig(**{k: v for k, v in meta["user_config"].items() if k in TinyConfig.__dataclass_fields__})
    out = []
    for p in prompts or sample_prompts(cfg):
        ids = generate(model, tok.encode(p, prepend=tok.bos_token_id), max_tokens, temperature, top_k, seed=0)
        out.append((p, tok.decode(i for i in ids if i not in tok.special_ids())))
    return out


def main(cfg: TinyConfig, out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """`nanosae train-lm`: train or reuse, then show what the model writes."""
    t = time.perf_counter()
    base = ensure_tiny_model(cfg, out, force)
    print(f"\nsamples from {base} (48 tokens, temperature 0.7, top-k 40):")
    for prompt, text in samples(base):
        print("-" * 100)
        print(prompt + text)
    print("-" * 100)
    print(f"done in {time.perf_counter() - t:.0f}s; load it with nanosae.load_model({str(base)!r})")
    return base


# ---------------------------------------------------------------------------------------------- chat (SFT)

SFT_MARKER = "train_sft.json"  # in chatsft_checkpoints/, written last: its presence means the chat model is complete
SFT_RECIPE = 1  # bump when a code change alters what an SFT config trains to


@dataclass
class SFTConfig:
    """The tiny chat phase, trained like nanochat's chat_sft: the base model and its optimizer split, learning
    rates lr_frac x the base run's, no warmup, linear warmdown to final_lr_frac, loss on the assistant's tokens
    only, on conversations about the standard library (data.chat_conversations) packed best-fit into rows of
    the base model's seq_len + 1 tokens. Everything here, the base model and the data's identity key the cache."""

    steps: int = 250  # optimizer steps (about 0.7 epochs of the conversations)
    batch_size: int = 8  # rows per step
    lr_frac: float = 0.8  # nanochat's init_lr_frac
    warmup_steps: int = 0  # linear LR warm-up
    warmdown_ratio: float = 0.5  # the LR decays linearly over this last fraction of the steps
    final_lr_frac: float = 0.0  # ... to this fraction of its start
    two_turn_every: int = 4  # one conversation in this many asks two questions (0: one question each)
    eval_every: int = 100  # steps between held-out answer losses
    compute: str = "auto"  # float32 | bfloat16 | auto, as for train-lm
    seed: int = 0  # data order

    def validate(self) -> None:
        if min(self.steps, self.batch_size, self.eval_every) < 1 or self.two_turn_every < 0:
            raise NanosaeError("steps, batch_size and eval_every must be positive, two_turn_every at least 0")
        if not (self.lr_frac > 0 and 0 <= self.warmdown_ratio <= 1 and self.final_lr_frac >= 0):
            raise NanosaeError("lr_frac must be positive, warmdown_ratio within 0..1, final_lr_frac at least 0")
        if self.compute not in ("auto", "float32", "bfloat16"):
            raise NanosaeError(f"compute {self.compute!r}: choose auto, float32 or bfloat16")


def pack_conversations(
    tok: Tokenizer, conversations: list[dict], row_len: int, buffer: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """nanochat's SFT batches: each conversation rendered with its loss mask (tok.render_conversation), packed
    best-fit into rows of row_len tokens (from a buffer of the next `buffer` conversations, the longest that still
    fits), a row that no conversation fits any more padded with BOS. Every row starts at a conversation's BOS and
    no conversation is split. Returns (inputs, targets), each (rows, row_len - 1); a target is -1 (not trained)
    wherever the mask is 0: user turns, <|assistant_start|>, padding. So only what the assistant says, its
    <|assistant_end|> included, is trained."""
    pending = iter([tok.render_conversation(c, max_tokens=row_len) for c in conversations])
    buf = [c for _, c in zip(range(buffer), pending)]
    rows, masks = [], []
    while buf:
        row: list[int] = []
        mask: list[int] = []
        while fits := [i for i, (ids, _) in enumerate(buf) if len(ids) <= row_len - len(row)]:
            ids, m = buf.pop(max(fits, key=lambda i: len(buf[i][0])))
            row += ids
            mask += m
            buf += [c for _, c in zip(range(1), pending)]
        rows.append(row + [tok.bos_token_id] * (row_len - len(row)))
        masks.append(mask + [0] * (row_len - len(mask)))
    ids, keep = torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)
    return ids[:, :-1], ids[:, 1:].masked_fill(~keep[:, 1:], -1)


def sft_hash(base_dir: Path, cfg: SFTConfig) -> str:
    """The chat model's cache key: the SFT config, the base checkpoint it starts from, the chat data's source."""
    files = resolve(base_dir, phase="base")
    base = {"step": files.step, "model": model_fingerprint(files.model)}
    key = {"recipe": SFT_RECIPE, "config": dataclasses.asdict(cfg), "base": base, "data": data.source_fingerprint(None)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def answer(model: GPT, tok: Tokenizer, question: str, max_tokens: int = 64) -> str:
    """The model's greedy reply to one user message, rendered as nanochat's chat_cli renders a first turn."""
    conversation = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
    prompt = tok.render_for_completion(conversation)
    ids = generate(model, prompt, max_tokens, stop_tokens=tok.stop_token_ids())
    return tok.decode(i for i in ids if i not in tok.special_ids()).strip()


def held_out_questions(n: int) -> list[tuple[str, str, str]]:
    """(question, reference answer, the name an answer on topic mentions) for the first turns of the first n
    held-out conversations."""
    convs = data.chat_conversations("val")[:n]
    return [
        (c["messages"][0]["content"], c["messages"][1]["content"], c["subjects"][0].rsplit(".", 1)[-1]) for c in convs
    ]


def on_topic_rate(model: GPT, tok: Tokenizer, n: int = 32) -> float:
    """The share of n held-out questions whose greedy answer names the function, class, module or keyword asked about."""
    qs = held_out_questions(n)
    return sum(name in answer(model, tok, q) for q, _, name in qs) / len(qs)


def train_sft(base_dir: Path, cfg: SFTConfig, out_dir: str | os.PathLike) -> dict:
    """Fine-tune the final base checkpoint of a train-lm folder into a chat model, written to out_dir/d<N>/ (out_dir
    becomes <base>/chatsft_checkpoints) with nanochat chat_sft's meta keys; returns the summary, also written to
    out_dir/train_sft.json, last."""
    t0 = time.perf_counter()
    model, tok, meta = load_model(base_dir, phase="base")
    base_cfg = TinyConfig(**{k: v for k, v in meta["user_config"].items() if k in TinyConfig.__dataclass_fields__})
    train_convs = data.chat_conversations("train", cfg.two_turn_every, cfg.seed)
    val_convs = data.chat_conversations("val", cfg.two_turn_every, cfg.seed)
    row_len = model.config.sequence_len + 1
    (train_x, train_y), (val_x, val_y) = (pack_conversations(tok, c, row_len) for c in (train_convs, val_convs))
    token_bytes = tok.token_byte_lengths()
    t_data = time.perf_counter() - t0
    trained = int((train_y >= 0).sum())
    print(
        f"chat data: {len(train_convs)} conversations ({trained / 1e3:.0f}k answer tokens) in {len(train_x)} rows of "
        f"{row_len} tokens; held out: {len(val_convs)} conversations about unseen subjects ({t_data:.1f}s)"
    )
    print(
        f"sft: {cfg.steps} steps x {cfg.batch_size} rows = {cfg.steps * cfg.batch_size / len(train_x):.2f} epochs, "
        f"learning rates {cfg.lr_frac} x the base run's"
    )
    history: list[dict] = []
    state = {
        "pos": 0,
        "epoch": 0,
        "order": torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed)),
    }
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["pos"] + cfg.batch_size > len(state["order"]):  # next epoch: a fresh order
            state["pos"], state["epoch"] = 0, state["epoch"] + 1
            state["order"] = torch.randperm(len(train_x), generator=g)
        idx = state["order"][state["pos"] : state["pos"] + cfg.batch_size]
        state["pos"] += cfg.batch_size
        return train_x[idx], train_y[idx]

    def at_step(step: int, smooth: float) -> None:
        if step % cfg.eval_every and step != cfg.steps:
            return
        was_training = model.training
        model.eval()
        loss, bpb = evaluate(model, val_x, val_y, token_bytes, cfg.batch_size)
        model.train(was_training)
        history.append({"step": step, "val_loss": loss, "val_bpb": bpb, "train_loss": smooth})
        tqdm.write(
            f"step {step:5d}/{cfg.steps} | train loss {smooth:.3f} | held-out answer loss {loss:.3f} | bpb {bpb:.3f}"
        )

    at_step(0, float("nan"))  # the base model on the held-out answers
    model.requires_grad_(True)
    smooth, seconds, probe = optimize(model, base_cfg, cfg, next_batch, at_step, "train-sft", lr_scale=cfg.lr_frac)
    model.requires_grad_(False)
    rate = on_topic_rate(model, tok)
    sft_meta = {  # nanochat chat_sft's keys, and where it started
        "val_bpb": history[-1]["val_bpb"],
        "user_config": dataclasses.asdict(cfg) | {"base_dir": str(base_dir), "base_step": model.info.step},
    }
    save_checkpoint(Path(out_dir) / f"d{model.config.n_layer}", cfg.steps, model, sft_meta)
    summary = {
        "hash": sft_hash(base_dir, cfg),
        "recipe": SFT_RECIPE,
        "config": dataclasses.asdict(cfg),
        "base": {"dir": str(base_dir), "step": model.info.step, "fingerprint": model.info.fingerprint},
        "conversations": {"train": len(train_convs), "held_out": len(val_convs)},
        "compute": _name(probe.choice[1]),
        "threads": probe.choice[0],
        "train_loss": smooth,
        "base_val_loss": history[0]["val_loss"],
        "val_loss": history[-1]["val_loss"],
        "val_bpb": history[-1]["val_bpb"],
        "on_topic": rate,
        "history": history,
        "seconds": {"data": t_data, "train": seconds, "total": time.perf_counter() - t0},
    }
    print(
        f"fine-tuned in {seconds:.0f}s: held-out answer loss {summary['base_val_loss']:.3f} (base) -> "
        f"{summary['val_loss']:.3f} nats/token; {100 * rate:.0f}% of {len(held_out_questions(32))} held-out greedy "
        "answers name what was asked about"
    )
    summary["sha256"] = file_digests(Path(out_dir))
    atomic_write_json(Path(out_dir) / SFT_MARKER, summary)
    return summary


def read_sft_marker(base_dir: Path) -> dict | None:
    try:
        return json.loads((base_dir / PHASE_DIRS["sft"] / SFT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_chat_model(base: str | os.PathLike | None = None, cfg: SFTConfig | None = None, force: bool = False) -> Path:
    """A tiny base dir (default: the default tiny model, trained first if needed) holding its chat model in
    chatsft_checkpoints/d<N>/, fine-tuned now unless it was for this config and this base model. `force`
    fine-tunes again. Returns the base dir: load_model(path, phase="sft") is the chat model, load_model(path,
    step) the base series (checkpoint.checkpoint_steps(path) lists its steps)."""
    cfg = cfg or SFTConfig()
    cfg.validate()
    base_dir = ensure_tiny_model() if base is None else Path(base).expanduser()
    fix = "pass a folder that `nanosae train-lm --out DIR` wrote, or leave --base out for the default tiny model"
    if not base_dir.is_dir():
        raise NanosaeError(f"{base_dir}: no such directory; {fix}")
    if read_marker(base_dir) is None:
        raise NanosaeError(f"{base_dir}: not a train-lm result (no {MARKER}); {fix}")
    target = base_dir / PHASE_DIRS["sft"]
    h = sft_hash(base_dir, cfg)
    marker = read_sft_marker(base_dir)
    if marker is not None and marker.get("hash") == h and not force:
        _verify(target, marker, SFT_MARKER)
        print(
            f"reusing the tiny chat model fine-tuned before in {target} (held-out answer loss {marker['val_loss']:.3f})"
        )
        return base_dir
    if target.exists() and any(target.iterdir()) and marker is None:
        raise NanosaeError(f"{target}: holds checkpoints train-sft did not write; move them away first")
    print(f"fine-tuning the tiny chat model (config {h}) into {target}")
    publish(
        target, lambda tmp: train_sft(base_dir, cfg, tmp), lambda t: (read_sft_marker(t.parent) or {}).get("hash") == h
    )
    return base_dir


def main_sft(cfg: SFTConfig, base: str | os.PathLike | None = None, force: bool = False, n_samples: int = 6) -> Path:
    """`nanosae train-sft`: fine-tune or reuse, then show greedy answers to held-out questions."""
    t = time.perf_counter()
    base_dir = ensure_chat_model(base, cfg, force)
    model, tok, _ = load_model(base_dir, phase="sft")
    print(f"\nheld-out questions (about subjects the fine-tuning never saw), greedy answers of {model.info.path}:")
    for question, reference, _ in held_out_questions(n_samples):
        print("-" * 100)
        print(f"Q: {question}\nA: {answer(model, tok, question)}\n   (reference: {reference})")
    print("-" * 100)
    print(
        f"done in {time.perf_counter() - t:.0f}s; chat with it: nanosae chat --model {base_dir} --sae SAE_DIR; "
        f"load it with nanosae.load_model({str(base_dir)!r}, phase='sft')"
    )
    return base_dir
