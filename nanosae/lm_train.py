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
the most quality per CPU-second (see the README).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import load_model, save_checkpoint
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
    key = {"recipe": RECIPE, "config": dataclasses.asdict(cfg), "data": data.source_fingerprint(cfg.data)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


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


def make_optimizers(model: GPT, cfg: TinyConfig) -> tuple[torch.optim.AdamW, Muon]:
    """nanochat's split: Muon for every matrix inside the blocks, AdamW (betas 0.8/0.95) for the rest."""
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
            g["initial_lr"] = g["lr"]
    return adam, muon


def lr_multiplier(step: int, cfg: TinyConfig) -> float:
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
def evaluate(model: GPT, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over rows of seq_len+1 tokens. Like nanochat, bpb counts
    only targets that are real text (token_bytes > 0), so special tokens neither add loss nor bytes."""
    nats = total_bytes = tokens = loss_sum = 0.0
    for i in range(0, len(rows), batch_size):
        x, y = rows[i : i + batch_size, :-1], rows[i : i + batch_size, 1:]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
        nb = token_bytes[y.flatten()]
        nats += (loss * (nb > 0)).sum().item()
        total_bytes += nb.sum().item()
        loss_sum += loss.sum().item()
        tokens += loss.numel()
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

    def __init__(self, cfg: TinyConfig, device: str, first: int = 2, block: int = 3):
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


def fit(
    cfg: TinyConfig,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    token_bytes: torch.Tensor,
    device: str = "cpu",
) -> tuple[GPT, dict]:
    """The training loop: a fresh current-generation GPT trained for cfg.steps on rows of seq_len+1 tokens,
    with val loss/bpb every eval_every steps and at the end. Returns (model, stats)."""
    torch.manual_seed(cfg.seed)
    # like nanochat's base_train, the vocab is the tokenizer's (BPE on little text can stop short of the target)
    model = GPT(dataclasses.replace(cfg.gpt_config(), vocab_size=len(token_bytes)), "current")
    model.init_weights(seed=cfg.seed)
    model.to(device)
    train_rows, val_rows, token_bytes = train_rows.to(device), val_rows.to(device), token_bytes.to(device)
    adam, muon = make_optimizers(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(
        f"model: nanochat d{cfg.n_layer}, n_embd {cfg.n_embd}, {model.num_params() / 1e6:.2f}M params, "
        f"seq_len {cfg.seq_len}; {cfg.steps} steps x {tokens_per_step} tokens = "
        f"{cfg.steps * tokens_per_step / 1e6:.2f}M tokens ({cfg.steps * tokens_per_step / train_rows.numel():.2f} "
        "epochs)"
    )
    history: list[dict] = []
    smooth, ema = float("nan"), 0.0
    pos = epoch = 0
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def run_eval(step: int) -> tuple[float, float]:
        model.eval()  # in fp32, as nanosae.load_model runs the checkpoint
        loss, bpb = evaluate(model, val_rows, token_bytes, cfg.batch_size)
        model.train()
        history.append({"step": step, "val_loss": loss, "val_bpb": bpb, "train_loss": smooth})
        bar.write(f"step {step:5d}/{cfg.steps} | train loss {smooth:.3f} | val loss {loss:.3f} | val bpb {bpb:.3f}")
        return loss, bpb

    probe = SpeedProbe(cfg, device)
    bar = tqdm(range(cfg.steps), desc="train-lm", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    try:
        for step in bar:
            if step > 0 and step % cfg.eval_every == 0:
                run_eval(step)
            if pos + cfg.batch_size > len(train_rows):  # next epoch: a fresh order
                pos, epoch = 0, epoch + 1
                train_rows = train_rows[torch.randperm(len(train_rows), generator=g).to(device)]
            batch = train_rows[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            t = time.perf_counter()
            muon.ns_dtype = dtype = probe.setting(step)
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            for opt in (adam, muon):
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_multiplier(step, cfg)
                opt.step()
            model.zero_grad(set_to_none=True)
            ema = 0.9 * ema + 0.1 * loss.item()  # nanochat's debiased EMA of the train loss
            smooth = ema / (1 - 0.9 ** (step + 1))
            bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
            if note := probe.record(step, time.perf_counter() - t):
                bar.write(note)
        bar.close()
        seconds = time.perf_counter() - t0
        val_loss, val_bpb = run_eval(cfg.steps)
    finally:
        bar.close()
        probe.restore()
    tokens = cfg.steps * tokens_per_step
    stats = {
        "compute": _name(probe.choice[1]),
        "threads": probe.choice[0],
        "params": model.num_params(),
        "train_tokens": tokens,
        "train_loss": smooth,
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "min_val_bpb": min(h["val_bpb"] for h in history),
        "epoch": epoch,
        "history": history,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "gflops": 3 * model.flops_per_token() * tokens / seconds / 1e9,
    }
    return model, stats


def train(cfg: TinyConfig, out_dir: str | os.PathLike) -> dict:
    """Train a tokenizer and a model for cfg, write them into out_dir as a nanochat base dir, and return the
    run's summary (also written to out_dir/train_lm.json, last)."""
    cfg.validate()
    out = Path(out_dir)
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
    model, stats = fit(cfg, train_rows, val_rows, token_bytes)
    meta = {  # nanochat's meta_*.json keys (base_train)
        "val_bpb": stats["val_bpb"],
        "user_config": dataclasses.asdict(cfg),
        "device_batch_size": cfg.batch_size,
        "max_seq_len": cfg.seq_len,
        "total_batch_size": cfg.batch_size * cfg.seq_len,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 0, "epoch": stats["epoch"] + 1},
        "loop_state": {
            "min_val_bpb": stats["min_val_bpb"],
            "smooth_train_loss": stats["train_loss"],
            "total_training_time": stats["train_seconds"],
        },
    }
    save_checkpoint(out / "base_checkpoints" / f"d{cfg.n_layer}", cfg.steps, model, meta)
    summary = {
        "hash": config_hash(cfg),
        "recipe": RECIPE,
        "config": dataclasses.asdict(cfg),
        **stats,
        "seconds": {"tokenizer": t_tok, "data": t_data, "train": stats["train_seconds"]},
    }
    summary["seconds"]["total"] = time.perf_counter() - t0
    # every file of the folder, so a reuse can check that none was damaged since
    summary["sha256"] = {str(f.relative_to(out)): sha256_file(f) for f in sorted(out.rglob("*")) if f.is_file()}
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


def _verify(base_dir: Path, marker: dict) -> None:
    """Check every file against the sha256 the marker recorded when the folder was complete."""
    remedy = f"nothing was changed: delete {base_dir} to train it again"
    if not marker.get("sha256"):
        raise NanosaeError(f"{base_dir / MARKER}: records no checksums (an older nanosae wrote it); {remedy}")
    for name, digest in marker["sha256"].items():
        verify_sha256(base_dir / name, remedy, expected=digest)


def ensure_tiny_model(cfg: TinyConfig | None = None, out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The nanochat base dir of the tiny model for cfg (default TinyConfig()), trained now unless it is cached
    ($NANOSAE_HOME/tiny/<hash>, or `out` when given). `force` retrains. Load it with nanosae.load_model(path)."""
    cfg = cfg or TinyConfig()
    cfg.validate()
    h = config_hash(cfg)
    target = Path(out).expanduser() if out is not None else nanosae_home() / "tiny" / h
    marker = read_marker(target) if target.exists() else None
    if marker is not None and marker.get("hash") == h and not force:
        _verify(target, marker)
        print(f"reusing the tiny model trained before at {target} (val bpb {marker['val_bpb']:.3f})")
        return target
    if target.exists() and any(target.iterdir()) and marker is None:
        raise NanosaeError(f"{target}: exists and is not a train-lm result; choose an empty or new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed runs
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"training the tiny model (config {h}) into {target}")
    try:
        train(cfg, tmp)
        if target.exists():  # a finished older result (its marker was checked above), or an empty dir
            if (target / MARKER).exists() or not any(target.iterdir()):
                shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same config first: keep theirs
            if (read_marker(target) or {}).get("hash") != h:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
