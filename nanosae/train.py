"""The SAE training loop: one activation stream feeds several SAEs; Adam with LR warm-up and a final linear
decay; sparsity warm-up; dead-latent bookkeeping (AuxK / resampling read it); JSON-lines metrics; checkpoints
that resume bitwise; Ctrl-C and NaN/Inf handling; data-parallel training under torchrun.

One step, for every SAE: loss on this rank's share of the batch -> backward -> (several ranks: all-reduce the
gradients and the step's statistics) -> project decoder gradients -> clip -> Adam -> renormalise the decoder ->
update dead counters, firing density, thresholds, λ -> maybe resample, log, checkpoint, evaluate. In one CPU process
a loss computed from sparse codes (the TopK family's always; ReLU, Gated and JumpReLU SAEs' once their latents are
sparse) spares the two weight matrices the dense gradient: the backward leaves it unevaluated in a
nanosae.sparse.RowGrads that the step hands to adam_rows, which projects, updates and renormalises a block of
latents at a time.

An activation stream is an iterator of float32 (batch_size // world_size, d_in) tensors with attributes d_in,
site, model_name, context_size, dataset and a `state()` dict from which an equal stream continues exactly
(nanosae.activations.model_stream / cache_stream). A run with several sites (TrainConfig.sites) reads a stream of
dicts {site: batch} (the same tokens at every site, from one forward) with a `widths` dict {site: d_in}, and trains
every SAE recipe at every site; each learner reads the batch of its own site (Trainer.input). A transcoder run
(TrainConfig.targets {site: target site}) reads rows [input | target] side by side, and the stream's target_widths
says where they split. Under torchrun with
distribute_sites, each rank owns the dictionaries of some sites (nanosae.activations.ranks_sites), its stream gives
whole global batches of those sites, and it steps only those, with no gradient all-reduce; each rank keeps its own
checkpoint (checkpoint-r<rank>.pt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import sparse
from .distributed import dist_info
from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_text, remove_leftovers, verify_sha256
from .sae import SAE, LossOut, SAETrainConfig, TrainingSAE, training_sae

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# settings a resumed run may change; everything else must match the checkpoint (or the result would differ)
RESUMABLE = ("log_every", "checkpoint_every", "eval_every", "out", "device", "max_memory")


@dataclass
class TrainConfig:
    """One run: the SAEs to train (one recipe each), the data, the schedule and the bookkeeping."""

    saes: list[SAETrainConfig] = field(default_factory=lambda: [SAETrainConfig()])
    tokens: int = 2_000_000  # training tokens (steps = tokens // batch_size)
    batch_size: int = 4096  # global batch, split evenly across ranks
    lr_warmup_steps: int | None = None  # None: 5% of the steps, at most 1000
    lr_decay_frac: float = 0.2  # the LR decays linearly to 0 over this last fraction of the steps
    sparsity_warmup_frac: float = 0.05  # λ ramps linearly from 0 over this first fraction
    dead_tokens: int | None = None  # dead = not fired for this many tokens; None: min(10M, tokens / 10)
    density_tokens: int = 1_000_000  # time constant (tokens) of the firing-density average saved as sparsity
    seed: int = 0
    log_every: int = 20  # steps between metrics lines
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between calls of eval_fn (0: only at the end)
    out: str = "sae"
    device: str = "cpu"
    # where the activations come from (recorded so that --resume can rebuild the stream)
    model: str = ""
    model_step: int | None = None
    phase: str | None = None
    tokenizer: str | None = None
    generation: str | None = None
    site: str = ""
    sites: list[str] = field(default_factory=list)  # several sites: every SAE recipe at each, from one stream
    targets: dict[str, str] = field(default_factory=dict)  # transcoders: the site each input site's predicts
    distribute_sites: bool = False  # under torchrun: each rank trains the dictionaries of its share of the sites
    max_memory: float | None = None  # GB the run may use; refused before it starts when the estimate is above
    data: str | None = None
    seq_len: int | None = None
    activations: str = ""
    init_from: str = ""  # an SAE folder to fine-tune (its weights replace the fresh init): SAE-Track's chains

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def to_dict(self) -> dict:
        """As saved in checkpoints (JSON types: tuples become lists), so configs compare equal across a save."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["saes"] = [SAETrainConfig(**{**s, "matryoshka": tuple(s.get("matryoshka", ()))}) for s in d["saes"]]
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# distributed helpers (no-ops on one process)


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """DDP's gradient averaging, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = torch.empty_like(p).copy_(g.view_as(p))  # in the parameter's own memory layout


def _broadcast(module: torch.nn.Module) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


# ---------------------------------------------------------------------------------------------------------------
# schedules


def lr_factor(step: int, steps: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 over the last decay_frac of steps."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay = int(steps * decay_frac)
    if decay > 0 and step >= steps - decay:
        f *= (steps - step) / decay
    return f


def _warmup_steps(cfg: TrainConfig) -> int:
    return cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else min(1000, cfg.steps // 20)


def _site_seed(seed: int, site: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{site}".encode()).digest()[:8], "little") & (2**63 - 1)


def _dead_tokens(cfg: TrainConfig) -> int:
    return cfg.dead_tokens if cfg.dead_tokens is not None else max(cfg.batch_size, min(10_000_000, cfg.tokens // 10))


# ---------------------------------------------------------------------------------------------------------------
# the trainer: every SAE of a run and everything a step changes


class NonFiniteLoss(NanosaeError):
    """A loss became NaN or Inf; train() adds where the last good checkpoint is."""


class _Learner:
    """One SAE of a run with its optimizer and bookkeeping (all of it saved in checkpoints)."""

    def __init__(self, sae: TrainingSAE, dead_tokens: int, density_tokens: int, world: int, site: str = ""):
        self.sae, self.dead_tokens, self.density_tokens = sae, dead_tokens, density_tokens
        self.site = site  # the site it reads in a run of several sites ("" in a one-site run)
        self.name = f"{site}/{sae.cfg.name}" if site else sae.cfg.name
        sae.world = world  # its collectives (AuxK's variance, BatchTopK's cutoff) span the ranks
        c, dev = sae.cfg, sae.W_dec.device
        # sparse_update: a loss computed from sparse codes leaves W_enc's and W_dec's gradients in a RowGrads collector
        # and Adam applies them a block of latents at a time (adam_rows), never as dense tensors. A gradient
        # all-reduce or a global clip needs them whole, so those SAEs take the plain path. It pays on CPUs (cache and
        # memory); a GPU does better with one fused Adam over the whole weight than with a launch per block
        self.sparse_update = world == 1 and not c.grad_clip and dev.type == "cpu"
        adam_kw = {"fused": True} if dev.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(sae.parameters(), lr=c.lr, betas=(c.beta1, 0.999), **adam_kw)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=dev)  # tokens since each latent fired
        self.density = torch.zeros(sae.d_sae, dtype=torch.float64, device=dev)  # EMA of the firing frequency
        self.recent = torch.full((sae.d_sae,), -1.0, dtype=torch.float64, device=dev)  # the same over dead_tokens
        self.sums: dict[str, float] = {}  # metrics summed since the last log line
        self.last: dict[str, float] = {}  # the last logged means

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.dead_tokens

    @property
    def aux_latents(self) -> torch.Tensor:
        """The latents AuxK trains: the dead ones, and with aux_rare those firing far below the mean rate."""
        if not self.sae.cfg.aux_rare:
            return self.dead
        return self.dead | (self.recent < self.sae.cfg.aux_rare * self.recent.mean())

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "density": self.density,
            "recent": self.recent,
            "sums": dict(self.sums),
        }

    def load_state_dict(self, d: dict) -> None:
        sae = {("sparsity_coeff" if k == "coeff" else k): v for k, v in d["sae"].items()}  # older checkpoints: "coeff"
        self.sae.load_state_dict(sae)
        self.opt.load_state_dict(d["optimizer"])
        self.since_fired.copy_(d["since_fired"])
        self.density.copy_(d["density"])
        self.recent.copy_(d["recent"])
        self.sums = dict(d["sums"])

    @torch.no_grad()
    def optimize(self, lr_factor: float, row_grads: sparse.RowGrads | None) -> None:
        """Apply the step's gradients: project the decoder's, clip, Adam, renormalise the decoder. With row_grads
        (sparse_update) that the loss filled, W_enc and W_dec have no .grad: adam_rows applies theirs, projection and
        renorm included; a loss that took its dense path left them empty and wrote .grad."""
        sae, c = self.sae, self.sae.cfg
        sae.project_grads()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), c.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = c.lr * lr_factor
        self.opt.step()  # every parameter with a .grad
        if row_grads is None or not (row_grads.W_enc or row_grads.W_dec):
            sae.normalize_decoder()
        else:
            adam_rows(sae.W_enc, row_grads.W_enc, self.opt, transposed=True, unit_norm=False)
            adam_rows(sae.W_dec, row_grads.W_dec, self.opt, transposed=False, unit_norm=sae.unit_norm)
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def record(self, r: dict, lr_factor: float, n: float, var: float) -> None:
        """After the update: the SAE's own state (thresholds, λ), dead counters, firing densities, metric sums (n
        tokens in the global batch, var = their summed squared distance to the batch mean, for the FVU)."""
        fired = r["fired"].sum().item()  # latent firings in the global batch (mean L0 = fired / n)
        self.sae.after_step(r["extra"], fired / n, self.sae.cfg.lr * lr_factor)
        self.since_fired += int(n)
        self.since_fired[r["fired"] > 0] = 0
        rate = min(1.0, n / self.density_tokens)
        self.density.mul_(1 - rate).add_(r["fired"].to(self.density) / n, alpha=rate)
        first = self.recent[0] < 0  # the first batch starts the average
        self.recent.lerp_(r["fired"].to(self.recent) / n, 1.0 if first else min(1.0, n / self.dead_tokens))
        w = self.sae.world  # every rank reported its loss and aux; the sum over ranks is w times the mean
        step = {"loss": r["loss"] / w, "sse": r["sse"], "l0": fired, "aux": r["aux"] / w, "tokens": n, "var": var}
        for k, v in {**step, "steps": 1}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def flush(self) -> dict[str, float]:
        """Means since the last flush (FVU over all tokens of the interval) and the dead fraction now."""
        s, self.sums = self.sums, {}
        self.last = {
            "loss": s["loss"] / s["steps"],
            "fvu": s["sse"] / max(s["var"], 1e-30),
            "l0": s["l0"] / s["tokens"],
            "aux": s["aux"] / s["steps"],
            "dead_frac": self.dead.double().mean().item(),
        }
        return self.last


@torch.no_grad()
def adam_rows(
    p: torch.Tensor, grads: list[sparse.RowGrad], opt: torch.optim.Adam, transposed: bool, unit_norm: bool,
    block: int = 256,
) -> None:  # fmt: skip
    """torch's Adam step on a (d_sae, d) weight (stored transposed when `transposed`) whose gradient is the sum of
    unevaluated terms (a RowGrads list), evaluated a block of latents at a time: the dense gradient never exists, and
    each block is still in cache for the update. With unit_norm, each row's gradient loses its component along the
    row first and the row is renormalised after (docs/training.md), in the same pass."""
    group = opt.param_groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    state = opt.state[p]
    if not state:  # torch's own state layout, so checkpoints, resampling and the plain path all read it
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    W, m_all, v_all = (q.t() if transposed else q for q in (p, state["exp_avg"], state["exp_avg_sq"]))
    d_sae = W.shape[0]
    starts = list(range(0, d_sae, block)) + [d_sae]
    cuts = [g.codes.latent_offsets[starts].tolist() for g in grads]  # one host read per gradient term
    for i, (lo, hi) in enumerate(zip(starts, starts[1:])):
        g = grads[0].rows(lo, hi, cuts[0][i], cuts[0][i + 1])
        for term, cut in zip(grads[1:], cuts[1:]):
            g += term.rows(lo, hi, cut[i], cut[i + 1])
        w, m, v = W[lo:hi], m_all[lo:hi], v_all[lo:hi]
        if unit_norm:
            g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1)
        # torch.optim.Adam(fused=True)'s own kernel (one pass over the block); it reads the step, we advanced it
        torch._fused_adam_(
            [w], [g], [m], [v], [], [state["step"]], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        if unit_norm:
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _global_stats(
    outs: list[LossOut], inputs: dict[str, torch.Tensor], stop: bool, world: int
) -> tuple[bool, float, dict[str, float], list[dict]]:
    """The step's statistics over the global batch, summed over the ranks in one all-reduce of one float64 vector:
    whether any rank asked to stop, the token count n, for each input (by site) the tokens' summed squared distance
    to their mean (from the sums of x and |x|^2), and each SAE's loss, sse, aux, extras and firings."""
    x0 = next(iter(inputs.values()))
    flags = torch.tensor([float(stop), float(x0.shape[0])], dtype=torch.float64, device=x0.device)
    parts = [flags]
    for x in inputs.values():
        parts += [x.sum(0), torch.dot(x.reshape(-1), x.reshape(-1))]
    parts += [t for o in outs for t in (o.loss.detach(), o.sse, o.aux, *o.extra.values(), o.fired)]
    stats = torch.cat([t.double().reshape(-1) for t in parts])
    if world > 1:
        dist.all_reduce(stats)
    summed = iter(stats.split([t.numel() for t in parts]))
    flags = next(summed)
    stop, n = flags[0].item() > 0, flags[1].item()
    var = {}
    for site in inputs:
        x_sum, x_sq = next(summed), next(summed)
        var[site] = x_sq.item() - x_sum.pow(2).sum().item() / n
    results = []
    for o in outs:
        loss, sse, aux, *extra = (next(summed).view(()) for _ in range(3 + len(o.extra)))
        fired = next(summed)
        results.append(
            dict(loss=loss.item(), sse=sse.item(), aux=aux.item(), fired=fired, extra=dict(zip(o.extra, extra)))
        )
    return stop, n, var, results


class Trainer:
    """The SAEs of a run with their optimizers and counters. `step(x)` trains them all on one batch (this rank's
    share of it; with several sites a dict {site: batch}); `state_dict()` is what a checkpoint holds. Draws its
    initial weights from cfg.seed (with several sites, each site's from cfg.seed and the site, so that a rank
    owning some sites builds the same dictionaries as one process building them all). d_in: the input width, or
    {site: width} with several sites; owned: the sites whose dictionaries this process trains (default: all); d_out:
    the target width of transcoders (as d_in: one number, or {site: width}; 0: SAEs)."""

    def __init__(
        self,
        cfg: TrainConfig,
        d_in: int | dict[str, int],
        owned: list[str] | None = None,
        d_out: int | dict[str, int] = 0,
    ):
        self.cfg, self.d_in = cfg, d_in
        self.rank, self.world = dist_info()
        # the ranks that share each batch and average gradients: none when each rank owns its sites' dictionaries
        self.replicas = 1 if cfg.distribute_sites else self.world
        if cfg.steps < 1:
            raise NanosaeError(
                f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}; train on more tokens"
            )
        if cfg.batch_size % self.world:
            raise NanosaeError(f"batch size {cfg.batch_size} does not split over {self.world} ranks; use a multiple")
        torch.manual_seed(cfg.seed)
        self.dead_tokens = _dead_tokens(cfg)
        device = torch.device(cfg.device)
        self.learners = []
        for site in cfg.sites or [""]:
            if owned is not None and site not in owned:
                continue
            if site:
                torch.manual_seed(_site_seed(cfg.seed, site))
            width = d_in[site] if isinstance(d_in, dict) else d_in
            out = d_out.get(site, 0) if isinstance(d_out, dict) else d_out
            for s in cfg.saes:
                sae = training_sae(s, width, out).to(device)
                self.learners.append(_Learner(sae, self.dead_tokens, cfg.density_tokens, self.replicas, site))
        names = [learner.name for learner in self.learners]
        if len(set(names)) != len(names):
            raise NanosaeError(f"several SAEs share a name ({', '.join(names)}); give each a distinct name")
        self.step_count = 0
        self.lr_factor = 0.0
        self._lr_warmup_steps = _warmup_steps(cfg)
        self._sparsity_warmup_steps = max(1, int(cfg.sparsity_warmup_frac * cfg.steps))
        self._resample_at = {cfg.steps * j // 5 for j in range(1, 5)}

    @staticmethod
    def input(learner: _Learner, batch: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """What a learner reads from a step's batch: the batch itself, or its site's part of a several-site batch."""
        return batch if isinstance(batch, torch.Tensor) else batch[learner.site]

    def init(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Data-dependent init (input scale, b_dec, MSE normaliser) from the global batch this rank's batch
        belongs to."""
        samples = {}
        for learner in self.learners:
            if learner.site not in samples:  # every rank's rows: the global batch
                samples[learner.site] = learner.sae.world_gather(self.input(learner, batch))
            learner.sae.init_from_sample(samples[learner.site])
            learner.sae.normalize_decoder()
            if self.replicas > 1:
                _broadcast(learner.sae)

    def step(self, batch: torch.Tensor | dict[str, torch.Tensor], stop: bool = False) -> bool:
        """One optimisation step of every SAE on its input from `batch`; returns whether any rank asked to stop
        (after this step)."""
        step, cfg = self.step_count, self.cfg
        self.lr_factor = lr_factor(step, cfg.steps, self._lr_warmup_steps, cfg.lr_decay_frac)
        sparsity_warmup = min(1.0, (step + 1) / self._sparsity_warmup_steps)  # λ's factor
        outs, row_grads = [], []
        for learner in self.learners:
            # sparse_update (one CPU process): a sparse loss's backward leaves W_enc's and W_dec's gradients in
            # `grads`, unevaluated (nanosae.sparse.RowGrads), and their .grad None; the rest goes to .grad as usual
            grads = sparse.RowGrads() if learner.sparse_update else None
            out = learner.sae.loss(self.input(learner, batch), learner.aux_latents, sparsity_warmup, grads)
            out.loss.backward()
            outs.append(out)
            row_grads.append(grads)
        # the FVU's reference: what each site's dictionaries reconstruct (a transcoder's target columns)
        inputs = {learner.site: learner.sae.target(self.input(learner, batch)) for learner in self.learners}
        stop, n, var, results = _global_stats(outs, inputs, stop, self.replicas)
        if self.replicas > 1:
            for learner in self.learners:
                _all_reduce_grads(list(learner.sae.parameters()), self.replicas)
        bad = [(learner.name, r["loss"]) for learner, r in zip(self.learners, results) if not math.isfinite(r["loss"])]
        if self.replicas < self.world:  # ranks own different SAEs: they agree on stopping (and on failing) here
            flags = torch.tensor([float(stop), float(bool(bad))], device=inputs[self.learners[0].site].device)
            dist.all_reduce(flags)
            stop = flags[0].item() > 0
            if flags[1].item() > 0 and not bad:
                raise NonFiniteLoss(f"step {step}: the loss of an SAE on another rank is not finite; stopped.")
        for name, loss in bad:
            raise NonFiniteLoss(f"step {step}: the loss of {name} is {loss}; stopped.")
        for learner, r, grads in zip(self.learners, results, row_grads):
            learner.optimize(self.lr_factor, grads)  # Adam: from .grad, and W_enc/W_dec from grads by adam_rows
            learner.record(r, self.lr_factor, n, var[learner.site])
            if step + 1 in self._resample_at and learner.sae.cfg.resample:
                self._resample(learner, self.input(learner, batch))
        self.step_count += 1
        return stop

    def _resample(self, learner: _Learner, x: torch.Tensor) -> None:
        dead = learner.dead
        if learner.sae.resample(dead, x, learner.opt):
            learner.since_fired[dead] = 0
            if self.replicas > 1:
                _broadcast(learner.sae)

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "saes": [learner.state_dict() for learner in self.learners],
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, d: dict) -> None:
        for learner, state in zip(self.learners, d["saes"]):
            learner.load_state_dict(state)
        torch.set_rng_state(d["rng"])
        self.step_count = d["step"]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_name(cfg: TrainConfig, rank: int) -> str:
    """checkpoint.pt, or with distribute_sites each rank's own checkpoint-r<rank>.pt (its SAEs only)."""
    return f"checkpoint-r{rank}.pt" if cfg.distribute_sites else CHECKPOINT


def read_checkpoint(out: str | Path, name: str | None = None) -> dict:
    """The checkpoint of a run folder: config, step, SAE and Adam states, counters, RNG, stream positions. Without
    a name: checkpoint.pt, or rank 0's of a distribute_sites run (for its config)."""
    if name is None:
        name = CHECKPOINT if not (Path(out) / "checkpoint-r0.pt").is_file() else "checkpoint-r0.pt"
    path = Path(out) / name
    if not path.is_file():
        raise NanosaeError(f"{path}: no checkpoint to resume from; start without --resume")
    # torch.load checks no checksums: a flipped bit in a weight would resume silently into different results
    verify_sha256(path, "nothing was changed: restore it from a copy, or delete it to train from the start")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NanosaeError(f"{path}: unreadable checkpoint ({first}); delete it to train from the start") from None


def changed_settings(cfg: TrainConfig, ckpt: dict) -> list[str]:
    """The settings of cfg that differ from the checkpoint's, apart from those a resume may change (RESUMABLE)."""
    defaults = {k: v for k, v in TrainConfig().to_dict().items() if k != "saes"}  # fields newer than the checkpoint
    saved = {k: v for k, v in {**defaults, **ckpt["config"]}.items() if k not in RESUMABLE}
    now = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE}
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


def _check_resume(cfg: TrainConfig, ckpt: dict, world: int) -> None:
    # a resume may also change the length (tokens): more extend the run, finished or not, and the schedules (LR
    # warm-up and decay, λ warm-up, resampling, the default dead-latent window) follow the new length from the step
    # the run stands at. A finished run has decayed its LR to ~0: extended, it goes back to the full LR, then
    # decays again over the last lr_decay_frac of the new length.
    if changed := [k for k in changed_settings(cfg, ckpt) if k != "tokens"]:
        raise NanosaeError(f"--resume with different settings ({', '.join(changed)}); resume with the saved ones")
    if cfg.steps < ckpt["step"]:
        raise NanosaeError(
            f"--tokens {cfg.tokens:,} is fewer than the {ckpt['step'] * cfg.batch_size:,} tokens this run has "
            "trained; resume with as many or more"
        )
    if len(ckpt["streams"]) != world:
        raise NanosaeError(
            f"the checkpoint was written by {len(ckpt['streams'])} ranks; resume with as many, not {world}"
        )


def _save_checkpoint(out: Path, trainer: Trainer, stream) -> None:
    streams = [stream.state()]
    if trainer.world > 1:
        streams = [None] * trainer.world
        dist.all_gather_object(streams, stream.state())
    if trainer.rank == 0 or trainer.cfg.distribute_sites:
        state = {
            "version": 1,
            "config": trainer.cfg.to_dict(),
            "streams": streams,
            **trainer.state_dict(),
        }
        name = checkpoint_name(trainer.cfg, trainer.rank)
        atomic_write(out / name, lambda f: torch.save(state, f), checksum=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks between steps (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.requested = False
        self.saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrainConfig,
    stream_fn: Callable[[dict | None], object],
    eval_fn: Callable[[SAE], dict] | None = None,
    resume: bool = False,
    progress: bool = True,
    how_to_continue: str = "continue with --resume",
) -> list[SAE]:
    """Train every SAE of `cfg` on the stream that stream_fn(state) builds (state: None, or the saved position
    when resuming) and save them as SAELens folders: cfg.out itself for one SAE, cfg.out/<name> for several, and
    with several sites cfg.out/<site> (one recipe) or cfg.out/<site>/<name>. eval_fn(sae) runs on the inference
    SAE every eval_every steps and at the end; its dict is logged. Returns this process's SAEs. how_to_continue
    ends the message of a run stopped by Ctrl-C (a command that resumes by itself says so)."""
    out = Path(cfg.out)
    rank, world = dist_info()
    trainer, stream, first = _start(cfg, stream_fn, resume, out, rank, world)
    resumed = first is None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # temp files of checkpoint writes killed mid-way
        if not resumed and (out / METRICS).is_file():  # a run killed before its first checkpoint: start anew
            print(f"note: replacing {out / METRICS} of an earlier run that stopped before its first checkpoint")
    log = open(out / METRICS, "a" if resumed else "w") if rank == 0 else None
    meta = _meta(stream, cfg)
    steps = cfg.steps
    evaluates = eval_fn is not None and (rank == 0 or cfg.distribute_sites)  # ranks evaluate the SAEs they own
    bar = tqdm(
        total=steps, initial=trainer.step_count, disable=not progress or rank != 0, unit="step", dynamic_ncols=True
    )
    t0, tokens = time.perf_counter(), 0
    try:
        with _StopRequest() as stop_request:
            while trainer.step_count < steps:
                x = first if first is not None else _next_batch(stream, cfg, trainer.replicas)
                first = None
                try:
                    stop = trainer.step(x, stop_request.requested)
                except NonFiniteLoss as e:
                    raise NanosaeError(
                        f"{e} {_last_good(out, cfg, rank)} Lower the LR or check the activations, then --resume"
                    ) from None
                done, tokens = trainer.step_count, tokens + cfg.batch_size
                bar.update(1)
                if done % cfg.log_every == 0 or done == steps:
                    _log(trainer, tokens / (time.perf_counter() - t0), log, bar)
                if stop:
                    _save_checkpoint(out, trainer, stream)
                    if rank == 0:
                        bar.close()
                        print(
                            f"interrupted after step {done}/{steps}; checkpoint saved in "
                            f"{out / checkpoint_name(cfg, rank)}; {how_to_continue}"
                        )
                    raise KeyboardInterrupt
                if evaluates and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                    _evaluate(trainer, eval_fn, meta, log)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
                    _save_checkpoint(out, trainer, stream)
        _save_checkpoint(out, trainer, stream)
        saes = _finish(trainer, out, meta, eval_fn if evaluates else None, log)
    finally:
        bar.close()
        if log is not None:
            log.close()
    _summary(trainer, out, time.perf_counter() - t0, tokens)
    return saes


def _start(cfg: TrainConfig, stream_fn, resume: bool, out: Path, rank: int, world: int):
    """The run's trainer and stream: restored from the checkpoint in `out` when resuming, else freshly initialised
    from the first batch (returned too, to be trained on first; None when resuming)."""
    name = checkpoint_name(cfg, rank)
    ckpt = read_checkpoint(out, name) if resume else None
    if ckpt is not None:
        _check_resume(cfg, ckpt, world)
    elif (out / CHECKPOINT).exists() or list(out.glob("checkpoint-r*.pt")):
        raise NanosaeError(f"{out} holds a checkpoint of an earlier run; pass --resume to continue it or a new --out")
    stream = stream_fn(ckpt["streams"][rank] if ckpt else None)
    widths = getattr(stream, "widths", None) if cfg.sites else None
    if cfg.sites and widths is None:
        raise NanosaeError(
            f"a run at sites {cfg.sites} needs a stream of those sites: model_stream(model, tok, sites, …)"
        )
    if cfg.targets and getattr(stream, "targets", None) != cfg.targets:
        raise NanosaeError(
            f"a transcoder run needs a stream of its sites and targets {cfg.targets}: model_stream(…, targets=…)"
        )
    d_in, d_out = _split_widths(stream, widths)
    saved_in = ckpt["saes"][0]["sae"]["W_enc"].shape[0] if ckpt is not None else None
    if ckpt is not None and not cfg.sites and saved_in != d_in:
        raise NanosaeError(
            f"the activations are {d_in}-wide but the checkpoint's SAEs read {saved_in}; resume with the model "
            "site or cache the run started with"
        )
    owned = _owned(cfg, world, rank) if cfg.distribute_sites else None
    _check_memory(cfg, stream, widths or {"": stream.d_in}, owned, rank, d_out)
    trainer = Trainer(cfg, d_in, owned, d_out)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        if rank == 0:
            _truncate_metrics(out / METRICS, trainer.step_count)
        return trainer, stream, None
    first = _next_batch(stream, cfg, trainer.replicas)
    trainer.init(first)
    if cfg.init_from:
        _init_from(trainer, cfg, stream)
    return trainer, stream, first


def _split_widths(stream, widths: dict[str, int] | None) -> tuple[int | dict[str, int], int | dict[str, int]]:
    """(input width, target width) of the stream's rows, per site with several sites (a target's: 0 for SAEs)."""
    outs = getattr(stream, "target_widths", {})
    if widths:
        return {s: w - outs.get(s, 0) for s, w in widths.items()}, {s: outs.get(s, 0) for s in widths}
    d_out = outs.get(getattr(stream, "site", ""), 0)
    return stream.d_in - d_out, d_out


def _init_from(trainer: Trainer, cfg: TrainConfig, stream) -> None:
    """Replace the fresh weights by the SAE in cfg.init_from (after the data-dependent init set the input scale)."""
    from .hooks import canonical_site
    from .sae import load_sae

    sae = load_sae(cfg.init_from, cfg.device)
    where = f"--init-from {cfg.init_from}"
    if len(trainer.learners) > 1:
        raise NanosaeError(f"{where} starts one SAE; train one per run (one --arch, --k, --expansion)")
    site = getattr(stream, "site", "") or ""
    if sae.cfg.hook_name and site and canonical_site(sae.cfg.hook_name) != canonical_site(site):
        raise NanosaeError(
            f"{where} reads {sae.cfg.hook_name} but this run trains on {site}; leave out --layer/--site (the run "
            "then takes the SAE's site) or start from an SAE trained at that site"
        )
    if sae.cfg.d_in + sae.cfg.d_out != stream.d_in:
        raise NanosaeError(
            f"{where} reads {sae.cfg.d_in}-wide activations but the stream is {stream.d_in} wide; fine-tune it on "
            "a checkpoint of the model size it was trained on (and a transcoder on its --target)"
        )
    trainer.learners[0].sae.load_inference(sae)


def memory_estimate(
    cfg: TrainConfig, widths: dict[str, int], model: torch.nn.Module | None = None, buffer_bytes: int = 0,
    owned: list[str] | None = None, replicas: int = 1, d_out: int | dict[str, int] = 0,
) -> dict[str, int]:  # fmt: skip
    """The bytes a run (this process's share) holds at its peak, by part: the model's weights, each dictionary's
    weights with their gradients and Adam's two moments (fp32), the stream's shuffle buffer, and a few batches
    (this rank's rows at every site, a copy of each, and the widest dictionary's pre-activations, latents and their
    gradient). widths: {site: row width} ({"": width} for one site); d_out: transcoders' target widths (as Trainer's)."""
    dictionaries, widest = 0, 0
    for site, d_in in widths.items():
        if owned is not None and site not in owned:
            continue
        out = d_out.get(site, 0) if isinstance(d_out, dict) else d_out
        for s in cfg.saes:
            with torch.device("meta"):  # shapes only: nothing is allocated
                sae = training_sae(s, d_in - out, out)
            dictionaries += 4 * 4 * sum(p.numel() for p in sae.parameters())
            widest = max(widest, sae.d_sae)
    rows = cfg.batch_size // replicas
    read = [d for site, d in widths.items() if owned is None or site in owned]
    return {
        "model": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) if model else 0,
        "dictionaries": dictionaries,
        "buffer": buffer_bytes,
        "batches": 4 * (2 * rows * sum(read) + 3 * rows * widest),
    }


def _check_memory(
    cfg: TrainConfig, stream, widths: dict[str, int], owned: list[str] | None, rank: int, d_out: int | dict = 0
) -> None:
    """Before anything is allocated: a run at several sites states its memory estimate, and a run whose estimate
    exceeds max_memory is refused."""
    if not cfg.sites and not cfg.max_memory:
        return
    parts = memory_estimate(
        cfg, widths, getattr(stream, "model", None), getattr(stream, "buffer_bytes", 0), owned,
        1 if cfg.distribute_sites else dist_info()[1], d_out,
    )  # fmt: skip
    total = sum(parts.values())
    shown = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items())
    where = f"rank {rank}" if cfg.distribute_sites else "each process"
    if cfg.max_memory and total > cfg.max_memory * 1e9:
        raise NanosaeError(
            f"this run needs about {total / 1e9:.2f} GB on {where} ({shown}), more than --max-memory "
            f"{cfg.max_memory:g}; train fewer sites or narrower dictionaries per run, a smaller --batch-size, or "
            "spread the sites over GPUs with torchrun --distribute-sites"
        )
    if rank == 0 and cfg.sites:
        print(f"memory: about {total / 1e9:.2f} GB on {where} ({shown} GB)")


def _owned(cfg: TrainConfig, world: int, rank: int) -> list[str]:
    from .activations import ranks_sites

    return ranks_sites(cfg.sites, world)[rank] if cfg.distribute_sites else cfg.sites


def _folder(trainer: Trainer, out: Path, learner: _Learner) -> Path:
    """Where a learner's SAE goes: out for a run of one SAE, else out/<name>; with several sites out/<site>, or
    out/<site>/<name> when each site has several."""
    if not learner.site:
        return out if len(trainer.learners) == 1 else out / learner.name
    return out / learner.site if len(trainer.cfg.saes) == 1 else out / learner.site / learner.sae.cfg.name


def _finish(trainer: Trainer, out: Path, meta: dict, eval_fn, log) -> list[SAE]:
    """The inference SAEs; rank 0 (with distribute_sites, each rank for its own) also runs the final eval and
    saves them."""
    saes = [
        learner.sae.to_inference(**_learner_meta(meta, learner, trainer.cfg.targets)) for learner in trainer.learners
    ]
    if trainer.rank == 0 or trainer.cfg.distribute_sites:
        if eval_fn is not None:
            _evaluate(trainer, eval_fn, meta, log)
        for learner, sae in zip(trainer.learners, saes):
            sae.save(_folder(trainer, out, learner), sparsity=(learner.density + 1e-10).log10())
    return saes


def _next_batch(stream, cfg: TrainConfig, replicas: int) -> torch.Tensor | dict[str, torch.Tensor]:
    got = next(stream)
    widths = stream.widths if isinstance(got, dict) else {"": stream.d_in}
    for site, x in got.items() if isinstance(got, dict) else [("", got)]:
        if x.ndim != 2 or x.shape[0] != cfg.batch_size // replicas or x.shape[1] != widths[site]:
            raise NanosaeError(
                f"the activation stream gave a batch of shape {tuple(x.shape)}, expected "
                f"({cfg.batch_size // replicas}, {widths[site]}); build it with batch_size={cfg.batch_size}"
            )
    if isinstance(got, dict):
        return {site: x.to(device=cfg.device, dtype=torch.float32).contiguous() for site, x in got.items()}
    return got.to(device=cfg.device, dtype=torch.float32)


def _meta(stream, cfg: TrainConfig) -> dict:
    """The inference config fields that come from the data (and the run settings, for the record)."""
    run = {k: v for k, v in cfg.to_dict().items() if k != "saes"}
    site = getattr(stream, "site", "") or ""
    return {
        "hook_name": site,
        "hook_name_out": cfg.targets.get(site, ""),
        "model_name": getattr(stream, "model_name", "") or "",
        "context_size": getattr(stream, "context_size", 0) or 0,
        "dataset_path": str(getattr(stream, "dataset", "") or ""),
        "training": {"run": run},
    }


def _learner_meta(meta: dict, learner: _Learner, targets: dict[str, str]) -> dict:
    return (
        {**meta, "hook_name": learner.site, "hook_name_out": targets.get(learner.site, "")}
        if learner.site
        else dict(meta)
    )


def _write_lines(trainer: Trainer, lines: list[dict], log) -> list[dict]:
    """Write metrics lines to the log (rank 0); with distribute_sites every rank's lines, gathered in rank order.
    Returns the lines written (all ranks')."""
    if trainer.cfg.distribute_sites and trainer.world > 1:
        every = [None] * trainer.world
        dist.all_gather_object(every, lines)
        lines = [line for rank_lines in every for line in rank_lines]
    if log is not None:
        log.write("".join(json.dumps(line) + "\n" for line in lines))
        log.flush()
    return lines


def _log(trainer: Trainer, tok_s: float, log, bar) -> None:
    lines, lr = [], 0.0
    for learner in trainer.learners:
        m = learner.flush()
        lr = learner.sae.cfg.lr * trainer.lr_factor
        step = {"step": trainer.step_count, "tokens": trainer.step_count * trainer.cfg.batch_size}
        lines.append({**step, "sae": learner.name, **m, "lr": lr, "tok_s": tok_s})
    lines = _write_lines(trainer, lines, log)
    parts = [f"fvu {m['fvu']:.3f} L0 {m['l0']:.1f} dead {100 * m['dead_frac']:.1f}%" for m in lines]
    if len(parts) > 1:
        parts = [f"[{i}] {p}" for i, p in enumerate(parts[:3])]
    bar.set_postfix_str(" | ".join(parts) + f" lr {lr:.1e}", refresh=False)


def _evaluate(trainer: Trainer, eval_fn, meta: dict, log) -> None:
    lines = []
    for learner in trainer.learners:
        result = eval_fn(learner.sae.to_inference(**_learner_meta(meta, learner, trainer.cfg.targets)))
        lines.append({"step": trainer.step_count, "sae": learner.name, **{f"eval/{k}": v for k, v in result.items()}})
    _write_lines(trainer, lines, log)


def _last_good(out: Path, cfg: TrainConfig, rank: int) -> str:
    name = checkpoint_name(cfg, rank)
    if (out / name).is_file():
        return f"The last good checkpoint (step {read_checkpoint(out, name)['step']}) is kept in {out / name}."
    return "No checkpoint was written yet."


def _summary(trainer: Trainer, out: Path, seconds: float, tokens: int) -> None:
    """The final table, printed by rank 0 (with distribute_sites, of every rank's SAEs)."""
    rows = [
        (learner.name, learner.sae.cfg.d_sae, learner.last, _folder(trainer, out, learner))
        for learner in trainer.learners
    ]
    if trainer.cfg.distribute_sites and trainer.world > 1:
        every = [None] * trainer.world
        dist.all_gather_object(every, rows)
        rows = [row for rank_rows in every for row in rank_rows]
    if trainer.rank != 0:
        return
    print(
        f"\ntrained {len(rows)} SAE(s) on {tokens:,} tokens in {seconds:.0f}s ({tokens / max(seconds, 1e-9):,.0f} tok/s)"
    )
    print(f"{'sae':36s} {'d_sae':>7s} {'FVU':>7s} {'L0':>7s} {'dead %':>7s}  folder")
    for name, d_sae, m, folder in rows:
        fvu, l0, dead = (m.get(k, math.nan) for k in ("fvu", "l0", "dead_frac"))
        print(f"{name:36s} {d_sae:7d} {fvu:7.4f} {l0:7.1f} {100 * dead:7.2f}  {folder}")
    ckpt = checkpoint_name(trainer.cfg, 0).replace("r0", "r*")
    print(f"metrics: {out / METRICS}   checkpoint: {out / ckpt}")
