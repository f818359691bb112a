"""Model diffing with crosscoders: what changed between two models (the tiny base and chat models by default).

A crosscoder (nanosae.sae.CrosscoderSAE) is trained on the paired activations of models A and B at one site on
the same tokens; each latent has a decoder in each model, and the split of its norm says whose it is:
  relative decoder norm  r_i = |d_i^B| / (|d_i^A| + |d_i^B|)   (Lindsey et al. 2024: 0 A-only, 1/2 shared, 1 B-only)
  A-only when |d_i^B| < ratio |d_i^A|, B-only when |d_i^A| < ratio |d_i^B|, shared otherwise (ratio 0.2: Minder et
  al. 2025's Δ < 0.1 and Δ > 0.9), and for shared latents the cosine of d_i^A and d_i^B.
Latent Scaling (Minder et al. 2025, arXiv 2504.02922) checks an exclusive latent j (direction v = its decoder in the
model that owns it): per model m one least-squares scalar β so that β f_j(x) v explains a target over the tokens,
  β = Σ_t f_j(t) <v, y_t> / (|v|^2 Σ_t f_j(t)^2),
for y = the crosscoder's reconstruction of a^m (r) and y = its error with latent j's own term put back,
a^m - â^m + f_j d_j^m (ε). In the model that owns j both are about 1; in the other model a truly exclusive
latent has ν = β_other / β_own near 0 for both. ν^ε high: the other model's activations do carry the direction and
the crosscoder left it in the error (Complete Shrinkage); ν^r high: other latents rebuild it there (Latent
Decoupling). Either at or above the same ratio that made the latent exclusive by norm flags it as an artefact of
training, not a difference between the models. The same test on a shared latent that fired, both ratios below it,
finds it "redirected": shared by norm, but the direction its stronger model writes there is absent from the other
model's activations on those tokens (the other decoder points elsewhere): the models read the same tokens
differently, as when only the chat model has learned what its chat tokens mean.

`run_diff` is `nanosae diff`: models -> paired activation stream -> crosscoder (resumable) -> both sides saved as
ordinary SAEs -> statistics on held-out tokens -> diff.json, a histogram, a dashboard per side and an index of the
three groups -> a one-screen summary. Every stage reuses its result when run again.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import NanosaeError
from .fileio import atomic_write_json, atomic_write_text
from .sae import SAE, crosscoder_norms

GROUPS = ("a_only", "shared", "b_only")


# ---------------------------------------------------------------------------------------------------------------
# the analysis (pure functions of an inference crosscoder and paired activations)


def relative_norms(cc: SAE) -> np.ndarray:
    """r_i = |d_i^B| / (|d_i^A| + |d_i^B|) for every latent of an inference crosscoder (d_in = 2d)."""
    n = crosscoder_norms(cc.W_dec.detach().float().cpu())
    return (n[:, 1] / n.sum(1).clamp_min(1e-12)).numpy()


def classify(cc: SAE, ratio: float = 0.2) -> np.ndarray:
    """0 (A-only), 1 (shared) or 2 (B-only) per latent: exclusive when the weaker decoder norm is below `ratio`
    times the stronger."""
    n = crosscoder_norms(cc.W_dec.detach().float().cpu())
    group = np.ones(len(n), dtype=np.int64)
    group[(n[:, 1] < ratio * n[:, 0]).numpy()] = 0
    group[(n[:, 0] < ratio * n[:, 1]).numpy()] = 2
    return group


def decoder_cosines(cc: SAE) -> np.ndarray:
    """cos(d_i^A, d_i^B) per latent."""
    W = cc.W_dec.detach().float().cpu()
    A, B = W.view(len(W), 2, -1).unbind(1)
    return torch.nn.functional.cosine_similarity(A, B, dim=1).numpy()


@torch.no_grad()
def latent_scaling(cc: SAE, batches, progress: bool = False, top: int = 8) -> dict[str, np.ndarray]:
    """β per latent, model (A, B) and target (reconstruction "r", error "eps") over the paired batches x =
    [a^A ; a^B] (n, 2d), each latent along its own decoder in the model where that is larger; and the ratios
    nu_r, nu_eps (other model's β over the owner's). Also each latent's firing count and activation sum, its `top`
    largest activations ("top_values", (d_sae, top)) and the rows they were on ("top_rows": indices into all the
    rows of the batches, in order; -1 where it fired less often), and the crosscoder's explained variance in each
    model."""
    from tqdm import tqdm

    W = cc.W_dec.detach().float()
    d_sae, d = W.shape[0], W.shape[1] // 2
    D = W.view(d_sae, 2, d)
    owner = crosscoder_norms(W).argmax(1)
    V = D[torch.arange(d_sae), owner]  # (d_sae, d): each latent's direction
    vd = (D * V.unsqueeze(1)).sum(-1)  # (d_sae, 2): <v_j, d_j^m>
    num = torch.zeros(2, 2, d_sae, dtype=torch.float64)  # model, target (r, eps), latent
    f2 = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.float64)
    f_sum = torch.zeros(d_sae, dtype=torch.float64)
    moments = torch.zeros(2, 3 + d, dtype=torch.float64)  # per model: tokens, Σ|e|^2, Σ|a|^2, Σ a (for the EV)
    best = torch.zeros(top, d_sae), torch.full((top, d_sae), -1, dtype=torch.long)
    seen = 0
    for x in tqdm(batches, desc="latent scaling", unit="batch", disable=not progress, leave=False):
        x = x.to(cc.device, torch.float32)
        f = cc.encode(x)
        sparse_t = f.t().to_sparse()  # few latents fire per row: products with f cost its nonzeros, not n x d_sae
        recon = torch.sparse.mm(sparse_t.t(), W) + cc.b_dec
        # Σ_t f_j(t) y_t for y = the reconstruction and the error of both models, then <v_j, ·> per latent
        sums = torch.sparse.mm(sparse_t, torch.cat([recon, x - recon], 1)).view(d_sae, 2, 2, d)
        proj = (sums * V[:, None, None]).sum(-1).double().cpu()  # (d_sae, target (recon, error), model)
        ff = (f * f).sum(0).double().cpu()
        f2 += ff
        fired += (f > 0).sum(0).double().cpu()
        f_sum += f.sum(0).double().cpu()
        for m in range(2):
            num[m, 0] += proj[:, 0, m]  # Σ_t f_j <v_j, â^m>
            num[m, 1] += proj[:, 1, m] + ff * vd[:, m].double().cpu()  # latent j's own term put back
            part = slice(m * d, (m + 1) * d)
            a = x[:, part].double()
            err = (a - recon[:, part].double()).pow(2).sum()
            moments[m] += torch.cat([a.new_tensor([len(a), err, a.pow(2).sum()]), a.sum(0)]).cpu()
        vals, rows = f.cpu().topk(min(top, len(f)), dim=0)
        merged = torch.cat([best[0], vals]), torch.cat([best[1], rows + seen])
        order = merged[0].topk(top, dim=0).indices
        best = merged[0].gather(0, order), merged[1].gather(0, order)
        seen += len(x)
    beta = num / (f2 * V.double().pow(2).sum(1).cpu()).clamp_min(1e-30)
    own = owner.cpu()
    other = 1 - own
    idx = torch.arange(d_sae)
    nu = beta[other, :, idx] / beta[own, :, idx].where(beta[own, :, idx].abs() > 1e-12, torch.tensor(1e-12))
    n, sse, sq, total = moments[:, 0], moments[:, 1], moments[:, 2], moments[:, 3:]
    ev = 1 - sse / (sq - total.pow(2).sum(1) / n.clamp_min(1)).clamp_min(1e-30)
    return {
        "explained_variance": ev.numpy(),
        "tokens": int(n[0]),
        "beta": beta.numpy(),
        "nu_r": nu[:, 0].numpy(),
        "nu_eps": nu[:, 1].numpy(),
        "fired": fired.numpy(),
        "f_sum": f_sum.numpy(),
        "top_values": best[0].t().numpy(),
        "top_rows": best[1].where(best[0] > 0, torch.tensor(-1)).t().numpy(),
    }


def artefacts(groups: np.ndarray, scaling: dict, ratio: float = 0.2) -> np.ndarray:
    """Exclusive latents whose exclusivity Latent Scaling does not support: the other model's β is at least `ratio`
    times the owner's (ν^r or ν^ε >= ratio, the same ratio that made the latent exclusive by decoder norm). A latent
    that never fired has no evidence either way and is not flagged."""
    exclusive = groups != 1
    high = (np.abs(scaling["nu_r"]) >= ratio) | (np.abs(scaling["nu_eps"]) >= ratio)
    return exclusive & high & (scaling["fired"] > 0)


def redirected(groups: np.ndarray, scaling: dict, ratio: float = 0.2) -> np.ndarray:
    """Shared latents that fired whose direction in the model with the larger decoder the other model's
    activations do not carry: ν^r and ν^ε both below `ratio` (see the module doc)."""
    low = (np.abs(scaling["nu_r"]) < ratio) & (np.abs(scaling["nu_eps"]) < ratio)
    return (groups == 1) & low & (scaling["fired"] > 0)


# ---------------------------------------------------------------------------------------------------------------
# planted truth: two "models" built from a shared dictionary plus atoms of their own


@dataclass
class PlantedPair:
    """Paired activations with a known answer. Shared atoms appear in both models (B's direction slightly
    rotated from A's: a fine-tune moves directions a little) with the same coefficient; A-only and B-only atoms
    appear in one model; `scaled` atoms are shared but B carries them at `scale` of A's strength (an L1
    crosscoder tends to shrink their B decoder to zero: Complete Shrinkage); `redirected` atoms appear in both
    models on the same tokens, with B's direction orthogonal to A's. Each atom fires independently with
    probability `active / n_atoms`, coefficient Exp(1) + 0.5; Gaussian noise of std `noise` per coordinate."""

    d: int = 48
    shared: int = 40
    a_only: int = 8
    b_only: int = 8
    scaled: int = 0
    redirected: int = 0
    scale: float = 0.25
    rotate: float = 0.1
    active: float = 4.0
    noise: float = 0.01
    seed: int = 0
    dirs_a: torch.Tensor = field(init=False, repr=False)
    dirs_b: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed + 1_000_003)  # not the trainer's seed (see bench/ground_truth)
        n = self.n_atoms
        unit = torch.nn.functional.normalize
        A = unit(torch.randn(n, self.d, generator=g), dim=1)
        B = unit(A + self.rotate * unit(torch.randn(n, self.d, generator=g), dim=1), dim=1)
        s, a, b = self.shared + self.scaled, self.a_only, self.b_only
        B[self.shared : s] *= self.scale
        B[s : s + a] = 0  # A-only
        A[s + a : s + a + b] = 0  # B-only
        turn = B[s + a + b :] - (B[s + a + b :] * A[s + a + b :]).sum(1, keepdim=True) * A[s + a + b :]
        B[s + a + b :] = unit(turn, dim=1)  # redirected: orthogonal to A's direction
        self.dirs_a, self.dirs_b = A, B

    @property
    def n_atoms(self) -> int:
        return self.shared + self.scaled + self.a_only + self.b_only + self.redirected

    def truth(self) -> np.ndarray:
        """Per atom: 0 A-only, 1 shared, 2 B-only, 3 scaled (shared, weak in B), 4 redirected."""
        kinds = [1] * self.shared + [3] * self.scaled + [0] * self.a_only + [2] * self.b_only
        return np.array(kinds + [4] * self.redirected)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n paired rows [a^A ; a^B] (n, 2d)."""
        on = torch.rand(n, self.n_atoms, generator=g) < self.active / self.n_atoms
        c = on * (torch.empty(n, self.n_atoms).exponential_(1.0, generator=g) + 0.5)
        x = torch.cat([c @ self.dirs_a, c @ self.dirs_b], dim=1)
        return x + self.noise * torch.randn(x.shape, generator=g)


def match_planted(cc: SAE, planted: PlantedPair) -> tuple[np.ndarray, np.ndarray]:
    """For each planted atom, the latent whose decoder row [d^A ; d^B] has the largest cosine with [atom^A ;
    atom^B], and that cosine: (latents, cosines)."""
    W = torch.nn.functional.normalize(cc.W_dec.detach().float().cpu(), dim=1)
    atoms = torch.nn.functional.normalize(torch.cat([planted.dirs_a, planted.dirs_b], 1), dim=1)
    cos, idx = (atoms @ W.t()).max(1)
    return idx.numpy(), cos.numpy()


# ---------------------------------------------------------------------------------------------------------------
# nanosae diff


@dataclass
class DiffConfig:
    out: str = "nanosae-diff"
    model: tuple[str, ...] = ()  # model A, model B (one model with two phases or steps: two of its checkpoints)
    phase: tuple[str, ...] = ()  # their phases, in order (default: the tiny base model vs its chat model)
    step: tuple[int, ...] = ()  # their checkpoint steps, in order (default: each one's latest)
    layer: int | None = None  # None: the middle layer (n_layer // 2)
    site: str = "resid_post"
    data: str = "builtin+chat"  # a source; builtin+chat: a row of the built-in text, then one of chat, in turn
    arch: str = "crosscoder"  # crosscoder (BatchTopK, decoder-norm-weighted) | crosscoder_l1 (L1 on summed norms)
    k: int = 32  # crosscoder: active latents per token, on average over the batch
    expansion: int = 4  # latents = expansion x the concatenated width (2 x the model's)
    sparsity_coeff: float | None = None  # crosscoder_l1: λ (None: its default)
    lr: float | None = 1e-2  # Adam (the SAEs' width rule, 2e-4 / sqrt(d_sae / 2^14), is slow for a run this short)
    tokens: int = 3_500_000  # training rows, each a pair of activations
    passes: int = 7  # each paired forward trains this many shuffled passes: forwards for tokens / passes tokens
    batch_size: int = 4096
    ratio: float = 0.2  # exclusive when the weaker decoder norm is below ratio x the stronger (and Latent Scaling)
    eval_tokens: int = 65_536  # held-out tokens: Latent Scaling, explained variance, what each latent fires on
    viz_tokens: int = 32_768  # tokens per side for its dashboard (the summary reads the held-out pairs)
    device: str = "cpu"
    seed: int = 0
    force: bool = False  # train again even if this folder holds a finished crosscoder


def _specs(cfg: DiffConfig) -> list[dict]:
    """The two models to load: (path, phase, step) each, with a one-line error for a request that is not a pair."""
    models, phases, steps = list(cfg.model), list(cfg.phase), list(cfg.step)
    if not models:
        from .lm_train import ensure_chat_model

        models, phases = [str(ensure_chat_model())], phases or ["base", "sft"]
    if len(models) > 2 or len(phases) > 2 or len(steps) > 2:
        raise NanosaeError("diff compares two models: give --model (and --phase, --step) at most twice")
    if len(models) == 1:
        if max(len(phases), len(steps)) < 2:
            raise NanosaeError(
                "diff compares two models: give --model twice, or one base dir with --phase twice (--phase base "
                "--phase sft) or one checkpoint folder with --step twice"
            )
        models *= 2
    phases = phases * 2 if len(phases) == 1 else phases or [None, None]
    steps = steps * 2 if len(steps) == 1 else steps or [None, None]
    specs = [{"path": str(Path(m).expanduser()), "phase": p, "step": s} for m, p, s in zip(models, phases, steps)]
    if specs[0] == specs[1]:
        raise NanosaeError("model A and model B are the same checkpoint; pass two different ones")
    return specs


def _label(spec: dict, name: str, other: dict) -> str:
    """A short name for a side: its phase or step where that is what differs, else the model's name."""
    if spec["phase"] != other["phase"] and spec["phase"]:
        return {"sft": "chat", "rl": "rl"}.get(spec["phase"], spec["phase"])
    if spec["step"] != other["step"] and spec["step"] is not None:
        return f"step {spec['step']}"
    return name


def _load_pair(cfg: DiffConfig, specs: list[dict]):
    from .checkpoint import load_model

    loaded = [load_model(s["path"], s["step"], phase=s["phase"], device=cfg.device) for s in specs]
    (ma, ta, _), (mb, tb, _) = loaded
    probe = "def f(x):\n    return x  # é 漢字 <|bos|>"
    same = ta.get_vocab_size() == tb.get_vocab_size() and ta.encode(probe) == tb.encode(probe)
    if not same or ta.bos_token_id != tb.bos_token_id:
        raise NanosaeError(
            f"{ma.info.name} and {mb.info.name} use different tokenizers: a crosscoder pairs their activations "
            "token by token; diff two models that share one (e.g. a base model and its fine-tune)"
        )
    return ma, mb, ta


def _paired_batches(ma, mb, tok, site: str, data, n_tokens: int, tokens: list, rows: int = 16):
    """Held-out paired activations [a^A ; a^B] (BOS dropped), `rows` token rows per batch, n_tokens in all. Appends
    to `tokens` each batch's token rows, flattened, with the position in them of every activation row it yields."""
    import itertools

    from .data import token_rows
    from .hooks import run_with_cache

    seq_len = ma.config.sequence_len
    it = token_rows(tok, data, seq_len, "val", repeat=True)
    left, offset = n_tokens, 0
    with torch.no_grad():
        while left > 0:
            ids = torch.tensor(list(itertools.islice(it, rows)), dtype=torch.long)
            acts = [run_with_cache(m, ids.to(m.device), [site], stop_early=True)[1][site] for m in (ma, mb)]
            x = torch.cat([a.reshape(-1, a.shape[-1]).float() for a in acts], dim=1)
            keep = (ids != tok.bos_token_id).flatten()
            x = x[keep.to(x.device)][:left]
            tokens.append((ids.flatten(), keep.nonzero().flatten()[: len(x)] + offset))
            offset += ids.numel()
            left -= len(x)
            yield x


def _fires_on(tok, tokens: list, scaling: dict, seq_len: int) -> list[dict]:
    """Per latent, from its top activations on the held-out pairs: the tokens it fires on most often there (most
    frequent first) and its strongest context (text before, the token, text after: within its token row)."""
    import collections

    ids = torch.cat([t for t, _ in tokens]).tolist()
    where = torch.cat([p for _, p in tokens]).tolist()
    text = {}

    def piece(t: int) -> str:
        if t not in text:
            text[t] = tok.decode([t])
        return text[t]

    out = []
    for rows in scaling["top_rows"]:
        pos = [where[r] for r in rows if r >= 0]
        if not pos:
            out.append({"top_tokens": [], "context": ("", "", "")})
            continue
        top = collections.Counter(piece(ids[p]) for p in pos).most_common(3)
        p = pos[0]
        start = p - p % seq_len + 1  # after the row's BOS
        context = (
            "".join(piece(t) for t in ids[max(start, p - 24) : p]),
            piece(ids[p]),
            "".join(piece(t) for t in ids[p + 1 : min(p + 5, start - 1 + seq_len)]),
        )
        out.append({"top_tokens": [t for t, _ in top], "context": context})
    return out


def _train(cfg: DiffConfig, ma, mb, tok, site: str, folder: Path) -> SAE:
    """Train (or reuse, or resume) the crosscoder in `folder`; returns the inference crosscoder."""
    import shutil

    from .activations import paired_model_stream
    from .sae import SAETrainConfig, load_crosscoder
    from .train import CHECKPOINT, TrainConfig, changed_settings, read_checkpoint, train

    sae_cfg = SAETrainConfig(
        arch=cfg.arch,
        k=cfg.k,
        expansion=cfg.expansion,
        sparsity_coeff=cfg.sparsity_coeff,
        lr=cfg.lr,
        name="crosscoder",
    )
    tcfg = TrainConfig(
        saes=[sae_cfg],
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        out=str(folder),
        device=cfg.device,
        model=f"{ma.info.path} | {mb.info.path}",
        site=site,
        data=cfg.data,
        checkpoint_every=50,
        log_every=10,
    )
    resume = False
    if (folder / CHECKPOINT).exists():
        saved = read_checkpoint(folder)
        changed = changed_settings(tcfg, saved)
        if saved["streams"][0].get("passes", 1) != cfg.passes:  # a setting of the stream, not of the trainer
            changed.append("passes")
        if changed and not cfg.force:
            raise NanosaeError(
                f"{folder} holds a crosscoder trained with other settings ({', '.join(changed)}); pass --force or "
                "a new --out"
            )
        if not cfg.force and saved["step"] >= tcfg.steps and (folder / "cfg.json").is_file():
            print(f"reusing the crosscoder trained before in {folder}")
            return load_crosscoder(folder, cfg.device)
        if cfg.force:
            shutil.rmtree(folder)
        else:
            print(f"resuming the crosscoder in {folder} from step {saved['step']}")
            resume = True

    # a shuffle block of up to 256k pairs (384 MiB for the tiny pair's 2 x 192 fp32 columns), no more than needed
    buffer = min(1 << 18, max(cfg.tokens // cfg.passes, 4 * cfg.batch_size, ma.config.sequence_len))

    def stream(state):
        return paired_model_stream(
            ma,
            mb,
            tok,
            site,
            cfg.data,
            cfg.batch_size,
            seed=cfg.seed,
            state=state,
            buffer_tokens=buffer,
            passes=cfg.passes,
        )

    [cc] = train(tcfg, stream, resume=resume, how_to_continue="run the same command again to continue from it")
    return cc


def _save_sides(cc: SAE, folder: Path, names: list[str]) -> list[SAE]:
    """The crosscoder's record of its two models, and each side as an ordinary SAE in folder/a and folder/b."""
    from safetensors.torch import load_file

    from .sae import crosscoder_side

    sparsity_file = folder / "sparsity.safetensors"
    sparsity = load_file(sparsity_file)["sparsity"] if sparsity_file.is_file() else None
    if cc.cfg.training.get("crosscoder_models") != names:
        cc.cfg.training["crosscoder_models"] = names
        cc.save(folder, sparsity=sparsity)
    sides = []
    for i, side in enumerate("ab"):
        training = {**cc.cfg.training, "crosscoder_side": side}
        sae = crosscoder_side(cc, i, model_name=names[i], training=training)
        sae.save(folder / side, sparsity=sparsity)
        sides.append(sae)
    return sides


def _context(stats, i: int) -> tuple[str, str, str]:
    """Latent i's strongest example in `stats` as (text before, the token, text after), or empty strings."""
    ex = stats.examples(i)
    if not ex:
        return "", "", ""
    e, vocab = ex[0], stats.vocab
    toks = [vocab[t] for t in e["tokens"]]
    return "".join(toks[: e["index"]]), toks[e["index"]], "".join(toks[e["index"] + 1 :])


def _latent_rows(groups, rel, cos, scaling, flagged, turned, fires, stats_a, stats_b) -> list[dict]:
    """One record per latent for diff.json and the index page: what it fires on from the held-out pairs (exact),
    and from each side's dashboard (that side alone, special tokens not counted)."""
    n = max(scaling["tokens"], 1)
    rows = []
    for i in range(len(groups)):
        rows.append(
            {
                "latent": i,
                "group": GROUPS[groups[i]],
                "relative_norm": round(float(rel[i]), 4),
                "cos": round(float(cos[i]), 4),
                "density": float(scaling["fired"][i]) / n,
                "nu_r": round(float(scaling["nu_r"][i]), 4),
                "nu_eps": round(float(scaling["nu_eps"][i]), 4),
                "artefact": bool(flagged[i]),
                "redirected": bool(turned[i]),
                "top_tokens": fires[i]["top_tokens"],
                "context": fires[i]["context"],
                "top_tokens_a": [stats_a.vocab[t] for t in stats_a.top_tokens(i, 3)],
                "top_tokens_b": [stats_b.vocab[t] for t in stats_b.top_tokens(i, 3)],
            }
        )
    return rows


def _histogram(rel: np.ndarray, groups: np.ndarray, labels: list[str], ratio: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(rel, bins=50, range=(0, 1), color="#3b75af")
    for edge in (ratio / (1 + ratio), 1 / (1 + ratio)):
        ax.axvline(edge, color="#c44e52", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel(f"relative decoder norm |d_{labels[1]}| / (|d_{labels[0]}| + |d_{labels[1]}|)")
    ax.set_ylabel("latents")
    counts = np.bincount(groups, minlength=3)
    ax.set_title(f"{labels[0]}-only {counts[0]}  ·  shared {counts[1]}  ·  {labels[1]}-only {counts[2]}", fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _index_page(summary: dict, rows: list[dict], ctx: dict, out: Path) -> Path:
    """dashboard/index.html: the three groups, each latent with its strongest context on the held-out pairs, its
    strongest context in each side's dashboard and links to its page there (a/, b/). Token text is escaped."""
    la, lb = summary["labels"]
    e = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>nanosae diff</title><style>body{font:14px sans-serif;"
        "margin:1.5em}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
        "vertical-align:top}code{white-space:pre-wrap}mark{background:#fc6}.art{color:#999}</style>",
        f"<h1>{e(la)} vs {e(lb)} at {e(summary['site'])}</h1>",
        f"<p>{e(summary['models'][0])} (A) vs {e(summary['models'][1])} (B); {summary['d_sae']} latents; "
        f"explained variance A {summary['explained_variance'][0]:.3f}, B {summary['explained_variance'][1]:.3f}. "
        "Grey rows: Latent Scaling flags the exclusivity as an artefact. Redirected: shared latents whose direction "
        "in the model with the larger decoder the other model's activations lack (ν<sub>r</sub>, ν<sub>ε</sub> below "
        "the ratio). Held-out pairs: the strongest activation "
        "of the crosscoder on held-out tokens of both models; A alone, B alone: that side as an SAE on its own model "
        "(special tokens not counted).</p>",
        "<p><img src='../relative_norms.png' alt='histogram of relative decoder norms'></p><p>",
    ]
    titles = {"a_only": f"{la}-only", "redirected": "redirected (shared)", "shared": "shared", "b_only": f"{lb}-only"}
    counts = {**summary["counts"], "redirected": sum(summary["redirected"].values())}
    parts += [f"<a href='#{g}'>{e(titles[g])} ({counts[g]})</a> · " for g in titles] + ["</p>"]
    for g in titles:
        parts.append(
            f"<h2 id='{g}'>{e(titles[g])}</h2><table><tr><th>latent</th><th>r</th><th>cos</th>"
            f"<th>density</th><th>ν<sub>r</sub> / ν<sub>ε</sub></th><th>held-out pairs</th><th>{e(la)} alone</th>"
            f"<th>{e(lb)} alone</th></tr>"
        )
        members = (r for r in rows if r["group"] == g or (g == "redirected" and r["redirected"]))
        for r in sorted(members, key=lambda r: -r["density"]):
            i = r["latent"]
            before, tok, after = r["context"]
            cells = [
                f"<td><code>{e(before[-60:])}<mark>{e(tok)}</mark>{e(after[:20])}</code></td>" if tok else "<td>—</td>"
            ]
            for side in "ab":
                before, tok, after = ctx[side][i]
                text = f"<code>{e(before[-60:])}<mark>{e(tok)}</mark>{e(after[:20])}</code>" if tok else "—"
                cells.append(f"<td><a href='{side}/index.html#/f/{i}'>#{i}</a> {text}</td>")
            parts.append(
                f"<tr class='{'art' if r['artefact'] else ''}'><td>{i}</td><td>{r['relative_norm']:.2f}</td>"
                f"<td>{r['cos']:.2f}</td><td>{r['density']:.1e}</td><td>{r['nu_r']:.2f} / {r['nu_eps']:.2f}</td>"
                + "".join(cells)
                + "</tr>"
            )
        parts.append("</table>")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/5] {text}", flush=True)
    return time.perf_counter()


def run_diff(cfg: DiffConfig) -> dict:
    """`nanosae diff`: train a crosscoder on two models at one site and report what is whose (see the module doc)."""
    from .dashboard import write_dashboard
    from .features import FeatureConfig, load_or_compute
    from .hooks import canonical_site, site_name

    t_start, times = time.perf_counter(), {}
    out = Path(cfg.out).expanduser()
    if not 0 < cfg.ratio < 1:
        raise NanosaeError(f"--ratio must be in (0, 1), got {cfg.ratio}")
    if cfg.passes < 1:
        raise NanosaeError(
            f"--passes must be at least 1 (each paired forward trains that many passes), got {cfg.passes}"
        )
    t = _stage(1, "models")
    specs = _specs(cfg)
    ma, mb, tok = _load_pair(cfg, specs)
    layer = ma.config.n_layer // 2 if cfg.layer is None else cfg.layer
    site = canonical_site(site_name(layer, cfg.site), ma)
    canonical_site(site, mb)
    from .activations import check_pair

    check_pair(ma, mb, site)
    labels = [_label(specs[0], ma.info.name, specs[1]), _label(specs[1], mb.info.name, specs[0])]
    if labels[0] == labels[1]:
        labels = [f"{labels[0]} (A)", f"{labels[1]} (B)"]
    names = [ma.info.name, mb.info.name]
    times["models"] = time.perf_counter() - t
    print(f"A = {labels[0]}: {ma.info.path}\nB = {labels[1]}: {mb.info.path}\nsite {site}, width {ma.config.n_embd}")

    t = _stage(
        2,
        f"{cfg.arch} on {cfg.tokens:,} rows: {-(-cfg.tokens // cfg.passes):,} paired tokens (both models run on every "
        f"batch), {cfg.passes} shuffled passes over each",
    )
    folder = out / "crosscoder"
    cc = _train(cfg, ma, mb, tok, site, folder)
    side_a, side_b = _save_sides(cc, folder, names)
    times["train"] = time.perf_counter() - t

    t = _stage(3, f"Latent Scaling and explained variance on {cfg.eval_tokens:,} held-out tokens")
    tokens: list = []
    batches = _paired_batches(ma, mb, tok, site, cfg.data, cfg.eval_tokens, tokens)
    scaling = latent_scaling(cc, batches, progress=True)
    fires = _fires_on(tok, tokens, scaling, ma.config.sequence_len)
    groups, rel, cos = classify(cc, cfg.ratio), relative_norms(cc), decoder_cosines(cc)
    flagged, turned = artefacts(groups, scaling, cfg.ratio), redirected(groups, scaling, cfg.ratio)
    times["scaling"] = time.perf_counter() - t

    t = _stage(4, f"contexts: each side's latents over {cfg.viz_tokens:,} tokens of its own model")
    seq_len = min(128, ma.config.sequence_len)
    fcfg = FeatureConfig(n_tokens=max(cfg.viz_tokens, seq_len), seq_len=seq_len)
    stats = {
        side: load_or_compute(m, tok, sae, folder / side, cfg.data, fcfg)
        for side, m, sae in (("a", ma, side_a), ("b", mb, side_b))
    }
    times["features"] = time.perf_counter() - t

    t = _stage(5, "diff.json, histogram, dashboards")
    dash = out / "dashboard"
    for side in "ab":
        write_dashboard(stats[side], dash / side)
    rows = _latent_rows(groups, rel, cos, scaling, flagged, turned, fires, stats["a"], stats["b"])
    ctx = {side: [_context(stats[side], i) for i in range(len(rows))] for side in "ab"}
    counts = {g: int((groups == j).sum()) for j, g in enumerate(GROUPS)}
    summary = {
        "models": [
            s["path"]
            + (f" ({s['phase']})" if s["phase"] else "")
            + (f" step {s['step']}" if s["step"] is not None else "")
            for s in specs
        ],
        "labels": labels,
        "site": site,
        "arch": cfg.arch,
        "d_sae": cc.cfg.d_sae,
        "explained_variance": [round(float(v), 4) for v in scaling["explained_variance"]],
        "counts": counts,
        "artefacts": {g: int((flagged & (groups == j)).sum()) for j, g in enumerate(GROUPS)},
        "shared_cos_median": float(np.median(cos[groups == 1])) if counts["shared"] else None,
        "redirected": {side: int((turned & ((rel > 0.5) == (side == "b"))).sum()) for side in "ab"},
        "examples": _examples(rows),
        "files": {
            "crosscoder": str(folder),
            "side_a": str(folder / "a"),
            "side_b": str(folder / "b"),
            "diff_json": str(out / "diff.json"),
            "histogram": str(out / "relative_norms.png"),
            "dashboard": str(dash / "index.html"),
        },
        "config": dataclasses.asdict(cfg),
    }
    _histogram(rel, groups, labels, cfg.ratio, out / "relative_norms.png")
    _index_page(summary, rows, ctx, dash)
    times["report"] = time.perf_counter() - t
    summary["seconds"] = {k: round(v, 1) for k, v in times.items()} | {"total": round(time.perf_counter() - t_start, 1)}
    atomic_write_json(out / "diff.json", {**summary, "latents": rows})
    print_summary(summary)
    return summary


def _examples(rows: list[dict], n: int = 4) -> dict[str, list[dict]]:
    """The n most frequent exclusive latents of each side that Latent Scaling does not flag, and the 2n most
    frequent redirected shared latents."""
    found = {}
    for g in ("a_only", "b_only"):
        keep = (r for r in rows if r["group"] == g and not r["artefact"] and r["density"] > 0)
        found[g] = sorted(keep, key=lambda r: -r["density"])[:n]
    found["redirected"] = sorted((r for r in rows if r["redirected"]), key=lambda r: -r["density"])[: 2 * n]
    return found


def print_summary(s: dict) -> None:
    bar = "=" * 78
    la, lb = s["labels"]
    c, a = s["counts"], s["artefacts"]
    print(f"\n{bar}\nnanosae diff: {la} vs {lb} at {s['site']}, done in {s['seconds']['total']:.0f}s")
    print(f"A  {s['models'][0]}\nB  {s['models'][1]}")
    ev = s["explained_variance"]
    print(f"crosscoder  {s['arch']}, {s['d_sae']} latents; explained variance {la} {ev[0]:.3f}, {lb} {ev[1]:.3f}")
    cos = s["shared_cos_median"]
    print(
        f"latents     {la}-only {c['a_only']} ({a['a_only']} flagged as artefacts)   shared {c['shared']}"
        + (f" (median decoder cos {cos:.2f})" if cos is not None else "")
        + f"   {lb}-only {c['b_only']} ({a['b_only']} flagged)"
    )
    for g, label in (("b_only", lb), ("a_only", la)):
        if not s["examples"][g]:
            print(f"no {label}-only latents" + (" that Latent Scaling does not flag" if c[g] else ""))
            continue
        print(f"{label}-only latents, most frequent first (on held-out tokens):")
        for r in s["examples"][g]:
            _print_latent(r, f"r={r['relative_norm']:.2f}")
    red = s["redirected"]
    print(
        f"redirected  {red['b']} shared latents: what {lb} writes on their tokens is absent from {la}'s activations;\n"
        f"            {red['a']} the other way round (Latent Scaling ν_r, ν_ε < {s['config']['ratio']:g})"
    )
    if s["examples"]["redirected"]:
        print("redirected latents, most frequent first (whose direction, decoder cosine):")
    for r in s["examples"]["redirected"]:
        _print_latent(r, f"{lb if r['relative_norm'] > 0.5 else la:>4}, cos={r['cos']:.2f}")
    f = s["files"]
    print(f"files       {f['diff_json']}  {f['histogram']}")
    print(f"dashboard   {f['dashboard']}  (the three groups and the redirected latents, with contexts)")
    print(f"as SAEs     {f['side_a']} ({la}), {f['side_b']} ({lb}): usable with eval, viz, chat")
    print(bar)


def _print_latent(r: dict, what: str) -> None:
    before, tok, after = r["context"]
    where = f"  e.g. {(before[-32:] + '[' + tok + ']' + after[:12])!r}" if tok else ""
    print(
        f"  #{r['latent']:<5d} {what} density {r['density']:.1e}  fires on {', '.join(map(repr, r['top_tokens']))}{where}"
    )


def train_planted(planted: PlantedPair, arch: str, steps: int, batch: int = 1024, **extra) -> SAE:
    """A crosscoder (`arch`) trained on `steps` batches of the planted pair, inference form."""
    from .sae import SAETrainConfig
    from .train import TrainConfig, Trainer

    cfg = TrainConfig(
        saes=[SAETrainConfig(arch=arch, d_sae=128, k=4, lr=3e-3, **extra)],
        tokens=steps * batch,
        batch_size=batch,
        log_every=10**9,
    )
    g = torch.Generator().manual_seed(1)
    trainer = Trainer(cfg, 2 * planted.d)
    trainer.init(planted.sample(batch, g))
    for _ in range(steps):
        trainer.step(planted.sample(batch, g))
    return trainer.learners[0].sae.to_inference()


def planted_artefacts(cc: SAE, shrink: int, split: int) -> SAE:
    """Complete Shrinkage at `shrink` (A decoder zeroed) and Latent Decoupling at `split` (a twin latent, same
    encoder, takes its B decoder) planted into an inference crosscoder."""
    t = {k: v.detach().clone() for k, v in cc.state_dict().items()}
    d = cc.cfg.d_in // 2
    t["W_dec"][shrink, :d] = 0
    twin = torch.cat([torch.zeros(d), t["W_dec"][split, d:]])
    t["W_dec"][split, d:] = 0
    t["W_dec"] = torch.cat([t["W_dec"], twin[None]])
    t["W_enc"] = torch.cat([t["W_enc"], t["W_enc"][:, split : split + 1]], 1)
    for k in ("b_enc", "threshold"):
        t[k] = torch.cat([t[k], t[k][split : split + 1]])
    out = SAE(type(cc.cfg)(**{**vars(cc.cfg), "d_sae": cc.cfg.d_sae + 1}))
    out.load_state_dict(t)
    return out
