"""Sparse autoencoders: the inference SAE (SAELens v6 folders in and out, sparsify folders and .pt state dicts in,
best_model.pt out) and the training side of every architecture, each in one class that holds its whole math.

Inference architectures use SAELens' names and tensors (x_hat = f W_dec + b_dec; W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_dec [d_in]; pre = (x - b_dec) W_enc + b_enc):
  standard  f = relu(pre)
  topk      f = relu(topk_k(pre))
  jumprelu  f = relu(pre) * (pre > threshold)
  gated     f = 1[(x - b_dec) W_enc + b_gate > 0] * relu((x - b_dec)(W_enc * exp(r_mag)) + b_mag)
A transcoder (SAEConfig.d_out > 0) reads one site and writes another (Dunefsky et al. 2024, arXiv 2406.11944): the
same four forms with the encoder reading x itself (pre = x W_enc + b_enc: b_dec lives in the output space), W_dec
[d_sae, d_out], b_dec [d_out]; a skip-transcoder adds x W_skip^T (W_skip [d_out, d_in], Paulo et al. 2025). Saved as
SAELens' transcoder, jumprelu_transcoder, skip_transcoder, jumprelu_skip_transcoder; a TopK transcoder has no SAELens
class and saves as topk_transcoder (nanosae reads it, SAELens does not).
And two that only loading makes (SignedSAE: nanochat PR #169's TopK and Gated variants, which SAELens cannot load;
their latents keep their sign):
  topk_signed   f = topk_k(pre)
  gated_signed  f = 1[(x - b_dec) W_gate + b_gate > 0] * pre

Training architectures (docs/training.md; e = x - x_hat; every loss is a mean over tokens):
  standard   ReLU + L1 (Anthropic 2023): f = relu(pre), L = |e|^2 + λ |f|_1, unit-norm decoder, resampling
  april      Anthropic April 2024: f = relu(x W_enc + b_enc) (no b_dec shift), L = |e|^2 + λ Σ_i f_i |W_dec[i]|,
             free decoder norms (init 0.1), gradient clipping
  topk       OpenAI: f = relu(topk_k(pre)), L = |e|^2 / mse_scale + α AuxK, unit-norm decoder, sparse decode
  batchtopk  the B*k largest relu(pre) of the batch; saved as jumprelu with the EMA of the smallest kept value
  gated      gate/magnitude paths sharing W_enc (W_mag = exp(r_mag) W_enc), L = |e|^2 + λ|relu(π_gate)|_1
             + |x - (relu(π_gate) W_dec.detach() + b_dec.detach())|^2, unit-norm decoder, resampling
  jumprelu   f = pre * H(pre - θ), L = |e|^2 + λ |f|_0 with straight-through gradients (bandwidth ε) to θ and pre
Matryoshka (topk, batchtopk): the loss averages the reconstruction error of every nested prefix of latents.
target_l0 (standard, april, gated, jumprelu): λ is steered during training until the mean L0 sits at the target,
so recipes can be compared at matched L0 without a sweep; for the TopK family it sets k.

Two vocabularies, on purpose: `architecture` (SAEConfig, cfg.json) is always one of the four inference forms above,
`arch` (SAETrainConfig, `--arch`) one of the six training architectures; each training arch saves as one inference
architecture (TrainingSAE.inference_architecture: batchtopk as jumprelu, april as standard).

Every training SAE sees its inputs scaled by one constant (E|x| = sqrt(d_in) when `normalize`); saving folds the
constant back (biases and thresholds / c), so the saved SAE reads and writes the model's own activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import sparse
from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json, torch_load

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "topk_signed", "gated_signed")
# target_l0: log λ moves by up to L0_GAIN x the step's LR per step. The L0 follows λ through parameters that Adam
# moves by about one LR per step, so a gain tied to the LR keeps the loop stable at any LR without lagging behind it.
L0_GAIN = 1.0
# BatchTopK takes each token's CANDIDATES * k largest pre-activations first (nanosae.sparse.batch_topk_select); a
# token with more in the batch's top B*k is recomputed whole. The number balances the two costs (measured)
CANDIDATES = 2
HINT_MARGIN = 0.9
# ReLU, Gated and JumpReLU SAEs train on the entries with a value or a gradient alone (sparse codes, as the TopK family)
# while those are at most this share of batch x d_sae, and by their dense definition above it (early in training).
# The sparse step stopped being the faster at ~0.06 with two threads and above 0.12 with one on a 2-vCPU VM
# (bench/train_throughput.py --sweep); more cores speed the matmuls more than the sparse kernels, so this sits below
SPARSE_MAX_DENSITY = 0.04
SAELENS_VERSION = "6.0.0"  # the on-disk format version we write (v6: LLM keys live under `metadata`)


@dataclass
class SAEConfig:
    """What an SAE is and where it reads: the inference architecture, sizes, and the site it was trained on."""

    architecture: str = "topk"  # the inference form (SAELens' name): standard | topk | jumprelu | gated
    d_in: int = 0
    d_sae: int = 0
    k: int | None = None  # topk only
    hook_name: str = ""  # nanosae site, e.g. "blocks.2.resid_post"
    model_name: str = ""  # e.g. "nanochat-d20"
    context_size: int = 0
    prepend_bos: bool = True
    dataset_path: str = ""
    dtype: str = "float32"
    training: dict = field(default_factory=dict)  # the training recipe (its `arch` among them), for the record
    d_out: int = 0  # a transcoder's output width (0: an SAE, which writes where it reads)
    skip: bool = False  # a skip-transcoder: x W_skip^T joins the output
    hook_name_out: str = ""  # a transcoder's output site, e.g. "blocks.2.mlp_out"

    @property
    def transcoder(self) -> bool:
        return self.d_out > 0

    @property
    def width_out(self) -> int:
        """The width of what it writes: d_out for a transcoder, d_in for an SAE."""
        return self.d_out or self.d_in

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise NanosaeError(
                f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise NanosaeError(f"d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        if self.architecture in ("topk", "topk_signed") and not (self.k and 0 < self.k <= self.d_sae):
            raise NanosaeError(f"topk needs 0 < k <= d_sae (got k={self.k}, d_sae={self.d_sae})")
        if (self.transcoder or self.skip) and self.architecture not in TRANSCODER_NAMES:
            raise NanosaeError(f"a {self.architecture} transcoder does not exist; use {', '.join(TRANSCODER_NAMES)}")


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out or cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(d_sae))
            self.b_mag = nn.Parameter(torch.zeros(d_sae))
            self.r_mag = nn.Parameter(torch.zeros(d_sae))
        else:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (the gate path for gated SAEs)."""
        x = x.to(self.W_enc.dtype)
        if not self.cfg.transcoder:
            x = x - self.b_dec
        if self.cfg.architecture == "gated":
            return x @ self.W_enc + self.b_gate
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents (..., d_sae) of activations (..., d_in)."""
        architecture = self.cfg.architecture
        pre = self.pre_acts(x)
        if architecture == "standard":
            return F.relu(pre)
        if architecture == "topk":
            return topk_relu(pre, self.cfg.k)
        if architecture == "jumprelu":
            return F.relu(pre) * (pre > self.threshold)
        mag = (x.to(self.W_enc.dtype) - self.b_dec) @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return (pre > 0) * F.relu(mag)

    def encode_sparse(self, x: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The n largest latents of each position of x (..., d_in), largest first: (values, ids), each (..., n).
        n=None: as many as can be nonzero (k for topk, else the most that fire on one position of x; at least 1),
        so every active latent is there and the rest is zero padding. Equal to encode(x).topk(n) (ids of zero values
        aside); topk, and standard with n given, never build the dense latents."""
        architecture, d_sae = self.cfg.architecture, self.cfg.d_sae
        if architecture == "topk" or (architecture == "standard" and n is not None):
            width = self.cfg.k if architecture == "topk" else d_sae
            # relu is monotone: the largest relu(pre) are relu of the largest pre
            vals, ids = self.pre_acts(x).topk(min(n or width, width), dim=-1)
            return vals.relu_(), ids
        f = self.encode(x)
        if n is None:
            n = max(1, int((f > 0).sum(-1).max()))
        return f.topk(min(n, d_sae), dim=-1)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The output of latents f; a skip-transcoder adds its skip term, so it needs the input x as well."""
        return self._with_skip(f @ self.W_dec + self.b_dec, x)

    def decode_sparse(self, vals: torch.Tensor, ids: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """decode of the latents encode_sparse gives, (values, ids) each (..., n), without the dense latents."""
        n = ids.shape[-1]
        flat = F.embedding_bag(ids.reshape(-1, n), self.W_dec, per_sample_weights=vals.reshape(-1, n), mode="sum")
        return self._with_skip(flat.view(*ids.shape[:-1], -1) + self.b_dec, x)

    def _with_skip(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.skip:
            return out
        if x is None:
            raise NanosaeError("a skip-transcoder's output depends on its input too: call decode(f, x)")
        return out + x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def save(self, path: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
        """Write a SAELens v6 folder: cfg.json, sae_weights.safetensors (+ sparsity.safetensors: log10 density)."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "sae_weights.safetensors", lambda f: f.write(save(tensors)))
        if sparsity is not None:
            log_density = sparsity.detach().float().cpu().contiguous()
            atomic_write(path / "sparsity.safetensors", lambda f: f.write(save({"sparsity": log_density})))
        atomic_write_json(path / "cfg.json", saelens_cfg(self.cfg))
        return path


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json as SAELens v6 writes it; nanosae's own fields ride along in `metadata` (kept by SAELens)."""
    from .hooks import saelens_hook_name

    out = {
        "architecture": saved_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": cfg.model_name,
            "hook_name": saelens_hook_name(cfg.hook_name) if cfg.hook_name else "",
            "hook_head_index": None,
            "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos,
            "dataset_path": cfg.dataset_path,
            "neuronpedia_id": None,
            "nanosae_site": cfg.hook_name,
            "nanosae_training": cfg.training,
        },
    }
    if cfg.architecture in ("topk", "topk_signed"):
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.architecture in SignedSAE.notes:  # for a reader of cfg.json, SAELens among them: it refuses the name
        out["metadata"]["nanosae_note"] = SignedSAE.notes[cfg.architecture]
    if cfg.transcoder:
        out["d_out"] = cfg.d_out
        out["metadata"]["hook_name_out"] = saelens_hook_name(cfg.hook_name_out) if cfg.hook_name_out else ""
        out["metadata"]["nanosae_site_out"] = cfg.hook_name_out
        if cfg.architecture == "topk":
            out["metadata"]["nanosae_note"] = TOPK_TRANSCODER_NOTE
    return out


# a transcoder's inference form -> SAELens' architecture name (plain, skip); topk has no SAELens class
TRANSCODER_NAMES = {
    "standard": ("transcoder", "skip_transcoder"),
    "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "topk": ("topk_transcoder", "topk_skip_transcoder"),
}
TOPK_TRANSCODER_NOTE = (
    "a TopK transcoder: f = relu(topk_k(x W_enc + b_enc)). SAELens has no TopK transcoder class and cannot load this "
    "folder; train with --arch transcoder (BatchTopK, saved as jumprelu_transcoder) for one SAELens reads."
)


def saved_architecture(cfg: SAEConfig) -> str:
    """The architecture name cfg.json carries: SAELens' name for an SAE's form, or for a transcoder's."""
    return TRANSCODER_NAMES[cfg.architecture][cfg.skip] if cfg.transcoder else cfg.architecture


# ---------------------------------------------------------------------------------------------------------------
# loading SAELens and sparsify folders


def _read_cfg(cfg_file: Path) -> dict:
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise NanosaeError(
            f"{cfg_file}: not valid JSON ({e}); the SAE folder is corrupt, save or download it again"
        ) from None
    if not isinstance(raw, dict):
        raise NanosaeError(f"{cfg_file}: not a JSON object; the SAE folder is corrupt, save or download it again")
    return raw


def _read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not weights_file.is_file():
        raise NanosaeError(f"{weights_file.parent}: no {weights_file.name}; the SAE folder is incomplete")
    try:
        return {k: v.float() for k, v in load_file(weights_file).items()}
    except Exception as e:
        raise NanosaeError(
            f"{weights_file}: cannot read safetensors ({e}); the file is corrupt, save it again"
        ) from None


def _site(hook: str) -> str:
    from .hooks import canonical_site

    try:
        return canonical_site(hook) if hook else ""
    except NanosaeError:
        return hook  # a hook name from another model family: keep it, the SAE can still encode/decode tensors


# the cfg.json fields a transcoder folder may have (SAELens' TranscoderConfig and ours); any other may change what
# it computes, so it is refused rather than ignored
TRANSCODER_FIELDS = {
    "architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm",
}  # fmt: skip


def _transcoder_form(raw: dict, where: Path) -> tuple[str, bool] | None:
    """(inference form, skip) of a transcoder cfg.json, None for an SAE; a one-line error for what nanosae cannot
    compute as written."""
    forms = {name: (form, bool(skip)) for form, names in TRANSCODER_NAMES.items() for skip, name in enumerate(names)}
    form = forms.get(raw.get("architecture"))
    if form is None:
        return None
    if unknown := sorted(set(raw) - TRANSCODER_FIELDS):
        raise NanosaeError(
            f"{where}: transcoder cfg.json fields {', '.join(unknown)} are unknown to nanosae (they may change what it "
            "computes); fold them into the weights and remove them, or load it with the tool that wrote it"
        )
    if not isinstance(raw.get("d_out"), int) or raw["d_out"] <= 0:
        raise NanosaeError(f"{where}: a transcoder's cfg.json needs d_out (its output width); add it")
    if raw.get("apply_b_dec_to_input") or raw.get("rescale_acts_by_decoder_norm"):
        raise NanosaeError(
            f"{where}: a transcoder with apply_b_dec_to_input or rescale_acts_by_decoder_norm set is not supported "
            "(SAELens refuses the first too); save it with both false"
        )
    return form


def _saelens_tensors(raw: dict, t: dict[str, torch.Tensor], where: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Map SAELens variants onto our four inference forms (x - b_dec always applied to an SAE, no rescaling)."""
    architecture = raw.get("architecture", "standard")
    if form := _transcoder_form(raw, where):
        norm = raw.get("normalize_activations", "none") or "none"
        if norm != "none":
            raise NanosaeError(
                f"{where}: normalize_activations={norm!r} is not folded into the weights; save it folded"
            )
        return form[0], t
    batchtopk = architecture in ("batchtopk", "matryoshka_batchtopk") and "topk_threshold" in t  # a training checkpoint
    if (architecture == "topk" or batchtopk) and raw.get("rescale_acts_by_decoder_norm"):  # top-k of pre*|W_dec|: fold
        n = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if batchtopk:  # its threshold applies to those (rescaled) activations
        t["threshold"] = t.pop("topk_threshold").reshape(()).expand(t["b_enc"].shape).clone()
        architecture = "jumprelu"
    if architecture not in ARCHITECTURES:
        raise NanosaeError(
            f"{where}: SAELens architecture {architecture!r} is not supported; use {', '.join(ARCHITECTURES)}"
        )
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise NanosaeError(f"{where}: normalize_activations={norm!r} is not folded into the weights; save it folded")
    if not raw.get("apply_b_dec_to_input", True) and "b_dec" in t and "W_enc" in t:  # pre = x W_enc + b: shift b
        shift = t["b_dec"] @ t["W_enc"]
        if architecture == "gated":
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] + shift
    return architecture, t


def _sparsify_hook(folder_name: str) -> str:
    """sparsify names hookpoints by module: layers.N is the block output (our resid_post)."""
    parts = folder_name.split(".")
    if len(parts) == 2 and parts[0] in ("layers", "h", "blocks") and parts[1].isdigit():
        return f"blocks.{parts[1]}.resid_post"
    return ""


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a folder: SAELens (ours or SAELens' own: standard, topk, jumprelu, gated, and batchtopk
    training checkpoints), a sparsify hookpoint folder (cfg.json + sae.safetensors) or a run folder of nanochat
    PR #169's scripts (best_model.pt); from a file of a folder (cfg.json, sae_weights.safetensors: the folder);
    or from a .pt state dict (read_pt). A crosscoder (`nanosae diff`) reads two models at once: load one side,
    its subfolder a/ or b/, or the whole with load_crosscoder."""
    sae = _load_any(path, device)
    if sae.cfg.training.get("arch") in CROSSCODERS and not sae.cfg.training.get("crosscoder_side"):
        folder = sae_folder(path)
        names = sae.cfg.training.get("crosscoder_models") or ["model A", "model B"]
        raise NanosaeError(
            f"{folder} is a crosscoder over two models; pass one side: {folder / 'a'} (for {names[0]}) or "
            f"{folder / 'b'} (for {names[1]})"
        )
    return sae


def load_crosscoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """A crosscoder folder that `nanosae diff` wrote, as one SAE over [a^A ; a^B] (d_in = 2 x the models' width)."""
    sae = _load_any(path, device)
    if sae.cfg.training.get("arch") not in CROSSCODERS:
        raise NanosaeError(f"{sae_folder(path)}: not a crosscoder; pass the crosscoder folder `nanosae diff` wrote")
    return sae


def _load_any(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    path = Path(path)
    if path.is_file() and path.suffix != ".pt":
        path = path.parent
    if path.is_dir() and not (path / "cfg.json").is_file() and (path / "best_model.pt").is_file():
        path = path / "best_model.pt"
    if path.is_file():
        (raw, tensors), weights = read_pt(path), path
    else:
        raw = _read_cfg(_cfg_file(path))
        if (path / "sae.safetensors").is_file() and not (path / "sae_weights.safetensors").is_file():
            return _load_sparsify(path, raw, device)
        weights = path / "sae_weights.safetensors"
        tensors = _read_tensors(weights)
    meta = raw.get("metadata", {}) or {}
    form = _transcoder_form(raw, path)
    architecture, tensors = _saelens_tensors(raw, tensors, path)
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    cfg = SAEConfig(
        architecture=architecture,
        **{k: raw[k] for k in ("d_in", "d_sae", "dtype", "d_out") if k in raw and k in known},
        k=raw.get("k") if architecture in ("topk", "topk_signed") else None,
        skip=bool(form and form[1]),
        hook_name=_site(meta.get("nanosae_site") or meta.get("hook_name") or raw.get("hook_name") or ""),
        hook_name_out=_site(
            meta.get("nanosae_site_out") or meta.get("hook_name_out") or raw.get("hook_name_out") or ""
        ),
        model_name=meta.get("model_name", raw.get("model_name", "")) or "",
        context_size=meta.get("context_size", raw.get("context_size", 0)) or 0,
        prepend_bos=meta.get("prepend_bos", True),
        dataset_path=meta.get("dataset_path", "") or "",
        training=meta.get("nanosae_training", {}) or {},
    )
    return _from_tensors(cfg, tensors, weights, device)


def _cfg_file(path: Path) -> Path:
    """The cfg.json of an SAE folder, or a one-line error that says what to pass instead."""
    if not path.is_dir():
        raise NanosaeError(
            f"{path}: not found; pass an SAE folder (cfg.json + sae_weights.safetensors) or a .pt state dict"
        )
    if not (path / "cfg.json").is_file():
        inner = sorted(p.parent.name for p in path.glob("*/sae.safetensors")) or sorted(
            p.parent.name for p in path.glob("*/sae_weights.safetensors")
        )
        hint = f" (it holds SAEs in {', '.join(inner[:5])}: pass one of those)" if inner else ""
        raise NanosaeError(f"{path}: no cfg.json; pass an SAE folder (cfg.json + sae_weights.safetensors){hint}")
    return path / "cfg.json"


def sae_folder(path: str | os.PathLike) -> Path:
    """Where an SAE's companions live (labels.json, feature_stats/, eval_core.json): the folder load_sae was given,
    or the folder of the file it was given."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _load_sparsify(path: Path, raw: dict, device) -> SAE:
    if raw.get("transcode") or raw.get("skip_connection"):
        raise NanosaeError(f"{path}: sparsify transcoders and skip connections are not supported")
    if raw.get("activation", "topk") != "topk":
        raise NanosaeError(f"{path}: sparsify activation {raw.get('activation')!r} is not supported (only topk)")
    t = _read_tensors(path / "sae.safetensors")
    if "encoder.weight" not in t:
        raise NanosaeError(f"{path / 'sae.safetensors'}: no encoder.weight; not a sparsify SAE")
    d_sae, d_in = t["encoder.weight"].shape
    # sparsify encodes topk(relu(pre)): the same latents as relu(topk(pre))
    tensors = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    cfg = SAEConfig(
        "topk", d_in=raw.get("d_in", d_in), d_sae=d_sae, k=raw.get("k"), hook_name=_sparsify_hook(path.name)
    )
    return _from_tensors(cfg, tensors, path / "sae.safetensors", device)


def _from_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: Path, device) -> SAE:
    sae = SignedSAE(cfg) if cfg.architecture in SignedSAE.notes else SAE(cfg)
    expected = sae.state_dict()
    if set(tensors) != set(expected):
        raise NanosaeError(
            f"{where}: tensors {sorted(tensors)} do not match a {cfg.architecture} SAE ({sorted(expected)})"
        )
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise NanosaeError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    sae.load_state_dict({k: v.contiguous() for k, v in tensors.items()})
    return sae.to(device)


# ---------------------------------------------------------------------------------------------------------------
# .pt state dicts: nanosae's best_model.pt and the checkpoints of nanochat PR #169's SAE scripts
# (github.com/karpathy/nanochat/pull/169, closed unmerged; sae/models.py and sae/trainer.py of that branch)


class SignedSAE(SAE):
    """The TopK and Gated variants of nanochat PR #169, loaded as what they are. Neither ends in a ReLU, so a latent
    can be negative; its Gated SAE decides with weights of its own (W_gate, b_gate) and takes the magnitude from
    W_enc without a ReLU: it is not the Gated SAE of Rajamanoharan et al. 2024 (architecture "gated")."""

    notes = {
        "topk_signed": "nanochat PR #169's TopK SAE: f = topk_k((x - b_dec) W_enc + b_enc), kept with their sign (no "
        "ReLU). SAELens has no such architecture (its topk applies a ReLU) and cannot load this folder.",
        "gated_signed": "nanochat PR #169's Gated SAE: f = 1[(x - b_dec) W_gate + b_gate > 0] * ((x - b_dec) W_enc + "
        "b_enc), a gate of its own and a magnitude without ReLU; not the Gated SAE of Rajamanoharan et al. 2024 "
        "(SAELens' gated). SAELens has no such architecture and cannot load this folder.",
    }

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if cfg.architecture == "gated_signed":
            self.W_gate = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
            self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        if self.cfg.architecture == "topk_signed":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals)
        gate = (x.to(self.W_gate.dtype) - self.b_dec) @ self.W_gate + self.b_gate > 0
        return gate * pre


# nanochat PR #169's hook points (forward hooks on a block, its attn, its mlp) as nanosae sites
PR169_SITES = {"hook_resid_post": "resid_post", "hook_attn": "attn_out", "hook_mlp": "mlp_out"}
PR169_ARCHITECTURES = {"topk": "topk_signed", "relu": "standard", "gated": "gated_signed"}
ENCODER_BIASES = ("b_enc", "b_gate", "b_mag", "threshold")


def read_pt(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A .pt of SAE tensors as load_sae reads a folder: (the cfg.json dict, the tensors in SAELens' names and
    layout). Either nanosae's layout (save_pt), or any plain state dict of W_enc, b_enc, W_dec, b_dec and the
    architecture's extras (threshold; b_gate, b_mag, r_mag) with `config` optional; or a checkpoint of nanochat
    PR #169's scripts: the tensors under `sae_state_dict` and a `config` with its `activation` (topk, relu, gated).
    d_in is the length of b_dec, d_sae that of the encoder bias; a matrix stored the other way round (nn.Linear's
    [out, in]) is turned."""
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise NanosaeError(f"{path}: holds a {type(obj).__name__}, not a state dict of SAE tensors")
    state, config = obj.get("sae_state_dict", obj), obj.get("config") or {}
    if not isinstance(state, dict) or not isinstance(config, dict):
        raise NanosaeError(f"{path}: not a state dict of SAE tensors (W_enc, b_enc, W_dec, b_dec, ...)")
    t = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}
    bias = next((b for b in ENCODER_BIASES if b in t), None)
    if "b_dec" not in t or bias is None or t["b_dec"].ndim != 1 or t[bias].ndim != 1:
        raise NanosaeError(f"{path}: tensors {sorted(t)}: no b_dec and encoder bias (b_enc); not an SAE state dict")
    if config.get("d_out"):  # a transcoder (nanosae's layout): b_dec is d_out wide, the config says the rest
        if not isinstance(config.get("d_in"), int):
            raise NanosaeError(f"{path}: a transcoder's config needs d_in; save it with nanosae's save_pt")
        return {**config, "d_sae": len(t[bias])}, t
    d_in, d_sae = len(t["b_dec"]), len(t[bias])
    if (config.get("d_in") or d_in, config.get("d_sae") or d_sae) != (d_in, d_sae):
        raise NanosaeError(
            f"{path}: config says d_in {config.get('d_in')}, d_sae {config.get('d_sae')} but the tensors are "
            f"{d_in} and {d_sae} wide; the file is inconsistent"
        )
    for name, shape in (("W_enc", (d_in, d_sae)), ("W_gate", (d_in, d_sae)), ("W_dec", (d_sae, d_in))):
        if name in t and d_in == d_sae and not config:
            raise NanosaeError(
                f"{path}: {name} is square ({d_in} x {d_sae}), so its shape does not tell which side is d_in; "
                "save it with a config (d_in, d_sae, architecture), as nanosae's best_model.pt has"
            )
        if name in t and d_in != d_sae and tuple(t[name].shape) == shape[::-1]:
            t[name] = t[name].t()
    if ("activation" in config and "architecture" not in config) or ("W_gate" in t and not config):
        return _pr169_cfg(path, config, t, d_in, d_sae), t
    raw = {**config, "d_in": d_in, "d_sae": d_sae}
    if "architecture" not in raw:
        raw["architecture"] = _architecture_from_keys(path, t, config)
    return raw, t


def _architecture_from_keys(path: Path, t: dict[str, torch.Tensor], config: dict) -> str:
    if "r_mag" in t:
        return "gated"
    if "threshold" in t:
        return "jumprelu"
    if "k" in config:
        return "topk"
    raise NanosaeError(
        f"{path}: W_enc, b_enc, W_dec, b_dec alone may be a ReLU or a TopK SAE; save it with "
        "config={'architecture': 'topk', 'k': K} (or 'standard'), as nanosae's best_model.pt has"
    )


def _pr169_cfg(path: Path, config: dict, t: dict[str, torch.Tensor], d_in: int, d_sae: int) -> dict:
    """The cfg.json dict of a nanochat PR #169 SAE; its biases take in the b_dec shift (its encoders read x itself:
    x W + b = (x - b_dec) W + (b + b_dec W))."""
    activation = config.get("activation", "gated")
    if activation not in PR169_ARCHITECTURES:
        raise NanosaeError(f"{path}: activation {activation!r} is not one of nanochat PR #169's (topk, relu, gated)")
    for W, b in (("W_enc", "b_enc"), ("W_gate", "b_gate")):
        if W in t and b in t:
            t[b] = t[b] + t["b_dec"] @ t[W]
    hook = str(config.get("hook_point", ""))
    layer, _, kind = hook.removeprefix("blocks.").partition(".")
    site = f"blocks.{layer}.{PR169_SITES[kind]}" if layer.isdigit() and kind in PR169_SITES else hook
    return {
        "architecture": PR169_ARCHITECTURES[activation],
        "d_in": d_in,
        "d_sae": d_sae,
        "k": config.get("k"),
        "metadata": {"hook_name": site, "nanosae_training": {"nanochat_pr169": config}},
    }


def save_pt(sae: SAE, path: str | os.PathLike) -> Path:
    """The SAE as one torch file, as nanochat PR #169's scripts name theirs (best_model.pt): a plain state dict (the
    tensors in SAELens' names) and `config`, the cfg.json dict; torch.load(weights_only=True) reads it."""
    state: dict = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    state["config"] = saelens_cfg(sae.cfg)
    return atomic_write(path, lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------------------------------------------
# training


@dataclass
class SAETrainConfig:
    """One SAE's training recipe. None picks the architecture's default (the `defaults` of its class)."""

    arch: str = "topk"  # the training architecture: standard | april | topk | batchtopk | gated | jumprelu
    kind: str = "sae"  # sae | transcoder | skip_transcoder (reads the run's site, predicts its target site)
    expansion: int = 16  # d_sae = expansion * d_in, unless d_sae is given
    d_sae: int = 0
    k: int = 32  # topk, batchtopk: active latents per token (batchtopk: on average over the batch)
    matryoshka: tuple[int, ...] = ()  # topk, batchtopk: nested prefix widths, e.g. (128, 512); d_sae closes it
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2^14) (the TopK paper's width rule)
    sparsity_coeff: float | None = None  # λ of the L1 (standard, april, gated) or L0 (jumprelu) penalty
    target_l0: float | None = None  # steer λ every step so the mean L0 settles here (TopK family: sets k)
    aux_coeff: float = 1 / 32  # AuxK weight (topk, batchtopk)
    aux_rare: float = 0.0  # topk, batchtopk: AuxK also trains latents firing below this fraction of the mean rate
    k_aux: int | None = None  # AuxK latents per token; None: d_in // 2
    normalize: bool | None = None  # scale inputs to E|x| = sqrt(d_in), folded into the weights at save (not topk)
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zero
    bandwidth: float = 2.0  # jumprelu: straight-through estimator bandwidth ε (Anthropic 2025, inputs at E|x| = √d)
    init_threshold: float | None = None  # jumprelu: initial θ; None: 0.1, or with target_l0 where L0 starts on target
    threshold_rate: float = 0.01  # batchtopk: EMA rate of the inference threshold
    resample: bool | None = None  # Anthropic resampling of dead latents at 20/40/60/80% of training
    grad_clip: float | None = None  # clip the gradient norm (0: off)
    beta1: float | None = None  # Adam beta1
    name: str = ""  # output subfolder when a run trains several SAEs

    def resolved(self, d_in: int) -> SAETrainConfig:
        """A copy with every default filled in and checked, for an input width d_in."""
        if self.arch not in TRAINING_CLASSES:
            raise NanosaeError(
                f"unknown training architecture {self.arch!r}; choose one of {', '.join(TRAINING_CLASSES)}"
            )
        cls = TRAINING_CLASSES[self.arch]
        c = dataclasses.replace(self, matryoshka=tuple(int(m) for m in self.matryoshka))
        c.d_sae = self.d_sae or self.expansion * d_in
        c.expansion = c.d_sae // d_in
        # a transcoder's two sides may differ in scale by orders of magnitude (mlp_in is normed, mlp_out is not):
        # each is scaled to E|x| = sqrt(width) unless told otherwise, so the init's unit decoder rows fit the target
        transcoder = {"normalize": True} if c.kind != "sae" else {}
        defaults = {**cls.defaults, **transcoder, "lr": 2e-4 / math.sqrt(c.d_sae / 2**14), "k_aux": d_in // 2}
        for key, value in defaults.items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        topk = issubclass(cls, TopKSAE)
        if c.kind not in KINDS:
            raise NanosaeError(f"unknown kind {c.kind!r}; choose one of {', '.join(KINDS)}")
        if c.kind != "sae" and c.arch not in TRANSCODER_ARCHS:
            raise NanosaeError(
                f"a transcoder with the {c.arch} activation is not supported; use {', '.join(TRANSCODER_ARCHS)}"
            )
        if c.target_l0 is not None and not 0 < c.target_l0 < c.d_sae:
            raise NanosaeError(f"target L0 must be in (0, d_sae={c.d_sae}), got {c.target_l0}")
        if topk and c.target_l0:
            c.k = max(1, round(c.target_l0))
        if topk and not 0 < c.k <= c.d_sae:
            raise NanosaeError(f"{c.arch} needs 0 < k <= d_sae (got k={c.k}, d_sae={c.d_sae}); lower --k")
        if c.matryoshka and (
            not topk or list(c.matryoshka) != sorted(set(c.matryoshka)) or c.matryoshka[-1] >= c.d_sae
        ):
            raise NanosaeError(
                f"matryoshka widths {c.matryoshka} must be increasing, below d_sae={c.d_sae}, topk family"
            )
        if c.b_dec_init not in ("geometric_median", "mean", "zero"):
            raise NanosaeError(f"unknown b_dec_init {c.b_dec_init!r}; use geometric_median, mean or zero")
        if not c.name:
            width = f"x{c.expansion}" if c.expansion * d_in == c.d_sae else f"w{c.d_sae}"
            detail = f"k{c.k}" if topk else f"L0{c.target_l0:g}" if c.target_l0 else f"l{c.sparsity_coeff:g}"
            c.name = f"{arch_flag(c.arch, c.kind)}{'_matryoshka' if c.matryoshka else ''}_{detail}_{width}"
        return c


KINDS = ("sae", "transcoder", "skip_transcoder")
TRANSCODER_ARCHS = ("batchtopk", "topk", "jumprelu", "standard", "april")  # the first is `--arch transcoder`'s


def split_arch(name: str) -> tuple[str, str]:
    """(arch, kind) of an --arch value: topk -> (topk, sae); transcoder -> (batchtopk, transcoder);
    jumprelu_skip_transcoder -> (jumprelu, skip_transcoder)."""
    for kind in ("skip_transcoder", "transcoder"):
        if name == kind or name.endswith("_" + kind):
            return name[: -len(kind)].rstrip("_") or TRANSCODER_ARCHS[0], kind
    return name, "sae"


def arch_flag(arch: str, kind: str) -> str:
    """The --arch value of (arch, kind): split_arch's inverse."""
    return arch if kind == "sae" else f"{arch}_{kind}"


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """relu(topk_k(pre)) as dense latents: each row's k largest pre-activations through a ReLU, every other one 0."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))


def geometric_median(x: torch.Tensor, iters: int = 200, tol: float = 1e-7, chunk: int = 1024) -> torch.Tensor:
    """The point minimising the summed distance to the rows of x (Weiszfeld's iteration, in float64; chunks of
    rows keep the float64 copies small, as this runs next to the training state)."""
    m = x.sum(0, dtype=torch.float64) / len(x)
    for _ in range(iters):
        num, den = torch.zeros_like(m), 0.0
        for part in x.split(chunk):
            part = part.double()
            w = 1 / (part - m).norm(dim=1).clamp_min(1e-12)
            num += w @ part
            den += w.sum()
        new = num / den
        done = (new - m).norm() <= tol * m.norm().clamp_min(1.0)
        m = new
        if done:
            break
    return m.float()


@dataclass
class LossOut:
    loss: torch.Tensor  # what backward() sees
    sse: torch.Tensor  # sum over the batch of |x - x_hat|^2, in the model's units (detached)
    fired: torch.Tensor  # (d_sae,) tokens each latent fired on
    aux: torch.Tensor  # the auxiliary or sparsity term (detached)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # architecture bookkeeping, summed over ranks


class TrainingSAE(nn.Module):
    """What every architecture shares: parameters, init, decoder constraint, resampling and the save-time
    conversion. A subclass holds one architecture's math: `loss` (and `encode`, `inference_tensors`)."""

    inference_architecture = "standard"
    unit_norm = True  # decoder rows kept at norm 1 with the parallel gradient removed (docs/training.md)
    decoder_init_norm = 1.0
    defaults: dict = {}
    enc_biases: tuple[str, ...] = ("b_enc",)  # per-latent encoder parameters, zeroed on resampling

    def __init__(self, cfg: SAETrainConfig, d_in: int, d_out: int = 0):
        super().__init__()
        self.cfg = cfg = cfg.resolved(d_in)
        self.transcoder = cfg.kind != "sae"
        if self.transcoder != (d_out > 0):
            raise NanosaeError(
                "a transcoder needs a target site (--target, e.g. mlp_out)" if self.transcoder else
                f"--target is for transcoders; train one with --arch transcoder (or {cfg.arch}_transcoder)"
            )  # fmt: skip
        self.d_in, self.d_sae, self.d_out = d_in, cfg.d_sae, d_out or d_in
        W_dec = torch.randn(cfg.d_sae, self.d_out)
        W_dec *= self.decoder_init_norm / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # encoder = decoder transpose (a transcoder's: random rows), stored as the transpose of a
        # (d_sae, d_in) matrix: the gradients of x @ W_enc (dense and sparse) arrive in that layout, so the
        # optimizer gets them without a transposing copy
        W_enc = W_dec.clone()
        if self.transcoder:  # small, so the random decoder's first output stays near b_dec (the target's median)
            W_enc = torch.randn(cfg.d_sae, d_in)
            W_enc *= 0.1 / W_enc.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_enc.t())
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if cfg.kind == "skip_transcoder":  # SAELens' layout (d_out, d_in); starts at zero, as SAELens' does
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in))
        for name in self.enc_biases:
            setattr(self, name, nn.Parameter(torch.zeros(cfg.d_sae)))
        self.register_buffer("input_scale", torch.tensor(1.0))  # c: the SAE sees c * x
        if self.transcoder:  # each side its own scale: the transcoder sees c x and predicts c_out y
            self.register_buffer("target_scale", torch.tensor(1.0))
            self.register_buffer("no_shift", torch.zeros(d_in), persistent=False)
        self.register_buffer("mse_scale", torch.tensor(1.0))  # E|c y - E[c y]|^2 of the init sample (y = x: an SAE)
        self.register_buffer("sparsity_coeff", torch.tensor(float(cfg.sparsity_coeff)))  # λ now (target_l0 moves it)
        self.world = 1  # data-parallel ranks sharing each batch (the trainer sets it under DDP)

    @property
    def output_scale(self) -> torch.Tensor:
        """c_out: the scale of what the decoder writes (an SAE's is its input scale)."""
        return self.target_scale if self.transcoder else self.input_scale

    def enc_shift(self) -> torch.Tensor:
        """What the encoder subtracts from its input: b_dec for an SAE; zeros for a transcoder (its encoder reads x
        itself, its b_dec is in the output space)."""
        return self.no_shift if self.transcoder else self.b_dec

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's activations -> (what the encoder reads, what the decoder must reconstruct), scaled. A
        transcoder's rows are [input | target] side by side (d_in + d_out); a skip-transcoder's decoder reconstructs
        the target minus the skip term (which carries W_skip's gradient). An SAE's two are one tensor."""
        if not self.transcoder:
            xs = x * self.input_scale if self.cfg.normalize else x  # (no copy when the scale is 1)
            return xs, xs
        xs, ys = x[:, : self.d_in] * self.input_scale, x[:, self.d_in :] * self.target_scale
        if self.cfg.kind == "skip_transcoder":
            ys = ys - xs @ self.W_skip.T
        return xs, ys

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled activations the decoder reconstructs (a transcoder's target columns): the FVU's reference."""
        return x[:, self.d_in :] if self.transcoder else x

    def world_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t, concatenated in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor) -> None:
        """Set the input scale(s), b_dec and the MSE normaliser from a sample of activations (n, d_in; a transcoder's
        n, d_in + d_out)."""
        sides = [(self.input_scale, x if not self.transcoder else x[:, : self.d_in])]
        if self.transcoder:
            sides.append((self.target_scale, self.target(x)))
        for scale, part in sides:  # E|c x| = sqrt(width) when normalizing
            scale.fill_(math.sqrt(part.shape[1]) / part.norm(dim=1).mean().item() if self.cfg.normalize else 1.0)
        ys = self.target(x) * self.output_scale  # before any skip: W_skip starts at zero
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(ys))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(ys.mean(0))
        self.mse_scale.fill_(torch.var(ys, dim=0, correction=0).sum().clamp_min(1e-12))

    def pre_acts(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.enc_shift()) @ self.W_enc + self.b_enc

    def encode(self, xs: torch.Tensor) -> torch.Tensor:
        """Dense latents of scaled inputs (for resampling and checks; training uses `loss`)."""
        raise NotImplementedError

    def loss(
        self, x: torch.Tensor, dead: torch.Tensor, sparsity_warmup: float, row_grads: sparse.RowGrads | None = None
    ) -> LossOut:
        """Loss on a batch of model activations x (n, d_in); `dead` (d_sae,) marks dead latents, `sparsity_warmup`
        in [0, 1] scales λ while it warms up. A loss computed from sparse codes leaves W_enc's and W_dec's gradients
        in `row_grads` instead of .grad when one is given (nanosae.sparse.RowGrads); a dense one leaves it empty."""
        raise NotImplementedError

    def firing(
        self, xs: torch.Tensor, bias: torch.Tensor, cut: torch.Tensor | float
    ) -> tuple[sparse.Codes, torch.Tensor] | None:
        """The entries where (xs - shift) W_enc + bias > cut, as (codes, values), while they are few enough for the
        sparse path to be the faster (SPARSE_MAX_DENSITY); else None, and the caller takes its dense path. On a CPU
        only, where the cut-off was measured."""
        if xs.device.type != "cpu":
            return None
        W = self.W_enc.detach()
        b = bias.detach() - self.enc_shift().detach() @ W
        return sparse.threshold_select(xs, W, b, cut, int(SPARSE_MAX_DENSITY * xs.shape[0] * self.d_sae))

    def residual(
        self, codes: sparse.Codes, f: torch.Tensor, target: torch.Tensor, row_grads=None, frozen: bool = False
    ) -> torch.Tensor:
        """target - x_hat for latents f at the code entries (x_hat = f W_dec + b_dec; `frozen`: with the decoder
        detached), built in the decode's own (n, d_in) memory."""
        W_dec, b_dec = (self.W_dec.detach(), self.b_dec.detach()) if frozen else (self.W_dec, self.b_dec)
        return sparse.decode(codes, -f, W_dec, row_grads).add_(target).add_(-b_dec)

    def fired(self, codes: sparse.Codes, f: torch.Tensor) -> torch.Tensor:
        """(d_sae,) how many tokens each latent fired on (f > 0) among the code entries."""
        return torch.bincount(codes.cols[f > 0], minlength=self.d_sae)

    def _out(self, loss, sse, fired, aux, **extra) -> LossOut:
        return LossOut(loss, sse.detach() / self.output_scale**2, fired, aux.detach(), extra)

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, dim) pairs whose slices along dim belong to one latent."""
        return [(self.W_enc, 1), (self.W_dec, 0)] + [(getattr(self, n), 0) for n in self.enc_biases]

    @torch.no_grad()
    def project_grads(self) -> None:
        """Remove from each decoder row's gradient its component along the row (which the renorm would undo)."""
        if self.unit_norm and self.W_dec.grad is not None:
            g, W = self.W_dec.grad, self.W_dec
            g.addcmul_(torch.linalg.vecdot(g, W).unsqueeze(1), W, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def after_step(self, extra: dict[str, torch.Tensor], l0: float, lr: float) -> None:
        """Update non-gradient state from the (all-ranks summed) extras of the step's LossOut, the global batch's mean
        L0 and the step's LR. With target_l0, λ is steered multiplicatively (an integral controller on log L0): it
        grows while L0 is above the target and shrinks while below."""
        target = self.cfg.target_l0
        if target and self.cfg.arch not in ("topk", "batchtopk"):
            err = max(-1.0, min(1.0, math.log(max(l0, 1e-3) / target)))
            self.sparsity_coeff.mul_(math.exp(L0_GAIN * lr * err))

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> int:
        """Anthropic 2023 ("Towards Monosemanticity", resampling): each dead latent gets an input sampled with probability ∝ loss^2 as
        its decoder row (unit norm) and encoder row (scaled to 0.2 x the mean alive encoder norm), a zero bias,
        and fresh Adam moments. Returns how many latents were resampled."""
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0 or idx.numel() == self.d_sae:
            return 0
        xs, ys = self.split(x)  # a transcoder: the input goes to the encoder row, the target to the decoder row
        loss = (self.encode(xs) @ self.W_dec + self.b_dec - ys).pow(2).sum(-1)
        p = loss.pow(2) if loss.pow(2).sum() > 0 else torch.ones_like(loss)
        pick = torch.multinomial(p, idx.numel(), replacement=idx.numel() > p.numel())
        v_in, v_out = (v[pick] / v[pick].norm(dim=1, keepdim=True).clamp_min(1e-12) for v in (xs, ys))
        alive_norm = self.W_enc[:, ~dead].norm(dim=0).mean()
        self.W_dec[idx] = v_out * (self.W_dec[~dead].norm(dim=1).mean() if not self.unit_norm else 1.0)
        self.W_enc[:, idx] = v_in.t() * 0.2 * alive_norm
        for name in self.enc_biases:
            getattr(self, name)[idx] = 0.0
        for p_, dim in self.latent_params():
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in optimizer.state.get(p_, {}):
                    optimizer.state[p_][moment].index_fill_(dim, idx, 0.0)
        return idx.numel()

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        """The inference SAE's tensors in the scaled units (x - b_dec applied to an SAE's input)."""
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {**t, "W_skip": self.W_skip} if self.cfg.kind == "skip_transcoder" else t

    def _unscale(self, names) -> dict[str, float]:
        """Per inference tensor, the factor that takes it to the model's units. Latents and encoder biases: 1/c
        (pre(c x)/c = pre'(x)); the output: 1/c_out, so W_dec (and W_skip) x c/c_out and b_dec x 1/c_out (an SAE's
        c_out = c: its decoder rows keep their trained norms)."""
        c, c_out = self.input_scale.item(), self.output_scale.item()
        out = {"W_enc": 1.0, "r_mag": 1.0, "W_dec": c / c_out, "W_skip": c / c_out, "b_dec": 1 / c_out}
        return {name: out.get(name, 1 / c) for name in names}

    @torch.no_grad()
    def to_inference(self, **meta) -> SAE:
        """The inference SAE reading (and writing) unscaled activations."""
        t = self.inference_tensors()
        scale = self._unscale(t)
        tensors = {k: v.detach() * scale[k] for k, v in t.items()}
        training = {
            **dataclasses.asdict(self.cfg),
            "final_sparsity_coeff": self.sparsity_coeff.item(),
            **meta.pop("training", {}),
        }
        k = self.cfg.k if self.inference_architecture == "topk" else None
        if self.transcoder:
            meta.update(d_out=self.d_out, skip=self.cfg.kind == "skip_transcoder")
        else:
            meta.pop("hook_name_out", None)
        cfg = SAEConfig(self.inference_architecture, self.d_in, self.d_sae, k=k, training=training, **meta)
        sae = SAE(cfg).to(self.W_dec.device)
        sae.load_state_dict({k: v.contiguous() for k, v in tensors.items()})
        return sae

    @torch.no_grad()
    def load_inference(self, sae: SAE) -> None:
        """Start from an inference SAE (to fine-tune it): the inverse of to_inference at this SAE's input scale c
        (set from a sample first), so this SAE computes what `sae` computes on c x, scaled by c."""
        form = self.inference_architecture
        mine = TRANSCODER_NAMES[form][self.cfg.kind == "skip_transcoder"] if self.transcoder else form
        theirs = saved_architecture(sae.cfg)
        if (theirs, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out or sae.cfg.d_in) != (
            mine, self.d_in, self.d_sae, self.d_out
        ):  # fmt: skip
            raise NanosaeError(
                f"the SAE to start from is {theirs} {sae.cfg.d_in}x{sae.cfg.d_sae}, this run trains "
                f"{self.cfg.arch} (saved as {mine}) {self.d_in}x{self.d_sae}; leave out "
                "--arch/--k/--expansion/--d-sae so the run takes them from the SAE"
            )
        t = {k: v.detach().to(self.W_dec) for k, v in sae.state_dict().items()}
        scale = self._unscale(t)
        self.set_inference_tensors({k: v / scale[k] for k, v in t.items()})

    def set_inference_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Set the parameters from tensors laid out as inference_tensors returns them."""
        for name, v in t.items():
            getattr(self, name).copy_(v)


class StandardSAE(TrainingSAE):
    """ReLU + L1 (Anthropic 2023): f = relu((x - b_dec) W_enc + b_enc), L = |x - x_hat|^2 + λ |f|_1, with a
    unit-norm decoder (so the L1 cannot be dodged by shrinking f and growing W_dec) and dead-latent resampling.
    `dense_loss` is this definition in plain dense PyTorch; `loss` computes the same from the entries with f > 0
    alone (sparse codes, nanosae.sparse) when they are few: nothing else has a value or a gradient."""

    defaults = {"sparsity_coeff": 5.0, "resample": True, "grad_clip": 0.0, "beta1": 0.9, "normalize": True}

    def encode(self, xs):
        return F.relu(self.pre_acts(xs))

    def penalty(self, f: torch.Tensor) -> torch.Tensor:
        return f.sum(-1)

    def dense_loss(self, x: torch.Tensor, dead: torch.Tensor, sparsity_warmup: float) -> LossOut:
        """The definition of `loss`: dense (batch x d_sae) latents, plain matmuls and autograd (the path early in
        training, when most latents fire; tests hold the sparse path to it)."""
        xs, target = self.split(x)
        f = self.encode(xs)
        err = (f @ self.W_dec + self.b_dec - target).pow(2).sum(-1)
        sparsity = self.penalty(f)
        loss = (err + sparsity_warmup * self.sparsity_coeff * sparsity).mean()
        return self._out(loss, err.sum(), (f > 0).sum(0), sparsity.mean())

    def loss(self, x, dead, sparsity_warmup, row_grads=None):
        xs, target = self.split(x)
        picked = self.firing(xs, self.b_enc, 0.0)
        if picked is None:
            return self.dense_loss(x, dead, sparsity_warmup)
        codes, pre_vals = picked
        f = sparse.gather(
            xs, self.enc_shift(), self.W_enc, self.b_enc, codes, pre_vals, row_grads
        )  # > 0: relu is a no-op
        sse = sparse.squared_error(self.residual(codes, f, target, row_grads))
        sparsity = f.sum()
        loss = (sse + sparsity_warmup * self.sparsity_coeff * sparsity) / len(x)
        return self._out(loss, sse, self.fired(codes, f), sparsity / len(x))


class AprilSAE(StandardSAE):
    """Anthropic April 2024: the encoder reads x itself (no b_dec shift), the L1 is weighted by decoder-row norms
    (Σ_i f_i |W_dec[i]|) instead of a unit-norm constraint; decoder rows start at norm 0.1; gradients clipped at 1."""

    unit_norm = False
    decoder_init_norm = 0.1
    defaults = {"sparsity_coeff": 5.0, "resample": False, "grad_clip": 1.0, "beta1": 0.9, "normalize": True}

    def pre_acts(self, xs):
        return xs @ self.W_enc + self.b_enc

    def penalty(self, f):
        return f @ self.W_dec.norm(dim=1)

    def loss(self, x, dead, sparsity_warmup, row_grads=None):  # its encoder and penalty are not the sparse path's
        return self.dense_loss(x, dead, sparsity_warmup)

    def inference_tensors(self):  # an SAE's x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        t = super().inference_tensors()
        return t if self.transcoder else {**t, "b_enc": self.b_enc + self.b_dec @ self.W_enc}

    def set_inference_tensors(self, t):
        super().set_inference_tensors(t)
        if not self.transcoder:
            self.b_enc -= self.b_dec @ self.W_enc


class TopKSAE(TrainingSAE):
    """OpenAI TopK: f = relu(topk_k((x - b_dec) W_enc + b_enc)), L = |x - x_hat|^2 / mse_scale + α AuxK, where
    AuxK = |e - e_hat|^2 / |e - mean e|^2 makes the k_aux most active dead latents reconstruct the residual
    e = x - x_hat (e_hat = their decode, no bias). Matryoshka: L averages |x - x_hat_g|^2 over the reconstructions
    x_hat_g from each nested prefix of latents. `reference_loss` is this definition in plain dense PyTorch; `loss`
    computes the same with a sparse decode and sparse gradients (nanosae.sparse)."""

    inference_architecture = "topk"
    defaults = {"resample": False, "grad_clip": 0.0, "beta1": 0.9, "sparsity_coeff": 0.0, "normalize": False}

    def reference_loss(self, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """The definition of `loss`, written out densely: (batch x d_sae) latents, plain matmuls and autograd. `loss`
        computes the same without the dense latents (tests hold the two to the same loss, gradients and Adam step).
        Slow and memory-hungry: it is for reading, for tests and for the throughput benchmark's reference."""
        xs, target = self.split(x)
        f = self.encode(xs)  # relu(topk_k(pre)), every other latent 0
        widths = (*self.cfg.matryoshka, self.d_sae)  # matryoshka: each nested prefix of latents reconstructs x alone
        errs = [target - (f[:, :m] @ self.W_dec[:m] + self.b_dec) for m in widths]  # e = x - x_hat
        mse = sum(e.pow(2).sum() for e in errs) / (len(errs) * len(x) * self.mse_scale)
        k_aux = min(self.cfg.k_aux, int(dead.sum()))
        if not k_aux:
            return mse
        # AuxK: the k_aux most active dead latents reconstruct the main error (without b_dec); a constant target
        e = errs[-1].detach()
        e_hat = topk_relu(self.pre_acts(xs).masked_fill(~dead, -math.inf), k_aux) @ self.W_dec
        aux = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        return mse + self.cfg.aux_coeff * aux

    def encode(self, xs):
        return topk_relu(self.pre_acts(xs), self.cfg.k)

    def select(self, xs: torch.Tensor, dead_idx: torch.Tensor, k_aux: int):
        """(codes, pre-activation values, aux codes, aux values) of scaled inputs xs."""
        W, b = self.W_enc.detach(), self.enc_bias()
        vals, idx, aux_vals, aux_idx = sparse.topk_select(xs, W, b, self.cfg.k, dead_idx, k_aux)
        aux = (sparse.topk_codes(aux_idx, self.d_sae), aux_vals.reshape(-1)) if k_aux else (None, None)
        return (sparse.topk_codes(idx, self.d_sae), vals.reshape(-1), *aux)

    def enc_bias(self) -> torch.Tensor:
        """b with pre = xs W_enc + b (the shift folded in), for the selection (no gradient)."""
        return self.b_enc.detach() - self.enc_shift().detach() @ self.W_enc.detach()

    def errors(
        self, codes: sparse.Codes, vals: torch.Tensor, target: torch.Tensor, row_grads=None
    ) -> list[torch.Tensor]:
        """The errors e = x - x_hat (x: the target) of each nested prefix of latents (just the full SAE without
        matryoshka). The
        decode of -vals is b_dec - x_hat, so e builds up in the decode's own (n, d_in) memory; only small tensors
        are negated (-b_dec: adding it needs no negated copy of the (n, d_in) gradient in the backward)."""
        neg_vals, neg_b_dec = -vals, -self.b_dec
        if not self.cfg.matryoshka:
            return [sparse.decode(codes, neg_vals, self.W_dec, row_grads).add_(target).add_(neg_b_dec)]
        shift = target + neg_b_dec
        bounds = torch.tensor(self.cfg.matryoshka, device=vals.device)
        group = torch.bucketize(codes.cols, bounds, right=True)  # prefix g holds latents below matryoshka[g]
        out, partial = [], 0
        for g in range(len(self.cfg.matryoshka) + 1):
            keep = group == g
            partial = partial + sparse.decode(codes.subset(keep), neg_vals[keep], self.W_dec, row_grads)
            out.append(partial + shift)
        return out

    def loss(self, x, dead, sparsity_warmup, row_grads=None):
        xs, target = self.split(x)
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(self.cfg.k_aux, dead_idx.numel())
        # which latents fire (no gradient flows through the choice), then their values with sparse gradients
        codes, pre_vals, aux_codes, aux_pre = self.select(xs, dead_idx, k_aux)
        vals = F.relu(sparse.gather(xs, self.enc_shift(), self.W_enc, self.b_enc, codes, pre_vals, row_grads))
        errs = self.errors(codes, vals, target, row_grads)
        e = errs[-1].detach()  # x - x_hat; read only in this forward (the backward overwrites it)
        aux = x.new_zeros(())
        if k_aux:  # AuxK
            aux_vals = F.relu(
                sparse.gather(xs, self.enc_shift(), self.W_enc, self.b_enc, aux_codes, aux_pre, row_grads)
            )
            e_hat = sparse.decode(aux_codes, aux_vals, self.W_dec, row_grads)
            m = torch.cat([e.sum(0), e.pow(2).sum().view(1), e.new_tensor([len(e)])])
            if self.world > 1:  # |e - mean e|^2 over the global batch: ranks average to the one-process loss
                dist.all_reduce(m)
            var = (m[-2] - m[:-2].pow(2).sum() / m[-1]).clamp_min(1e-12)
            aux = (e - e_hat).pow(2).sum() / var * (m[-1] / len(e))
        fired = vals.new_zeros(self.d_sae).index_add_(0, codes.cols, (vals > 0).to(vals.dtype))
        extra = self._extra(vals)
        sses = [sparse.squared_error(err) for err in errs]
        loss = sum(sses) / (len(sses) * len(x) * self.mse_scale) + self.cfg.aux_coeff * aux
        return self._out(loss, sses[-1], fired, aux, **extra)

    def _extra(self, vals: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class BatchTopKSAE(TopKSAE):
    """BatchTopK: keep the B*k largest relu(pre) of the whole batch (k per token on average; under DDP, of the
    global batch). Inference uses a threshold θ instead, the EMA of the smallest kept value per batch, so it is
    saved as a JumpReLU SAE."""

    inference_architecture = "jumprelu"

    def __init__(self, cfg, d_in, d_out=0):
        super().__init__(cfg, d_in, d_out)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0))
        self.cutoff_hint: float | None = None  # speeds up select; not state (nothing computed depends on it)

    def encode(self, xs):
        pre = F.relu(self.pre_acts(xs))
        flat = pre.flatten()
        keep = torch.zeros_like(flat).scatter_(0, flat.topk(min(self.cfg.k * xs.shape[0], flat.numel())).indices, 1)
        return pre * keep.view_as(pre)

    def select(self, xs, dead_idx, k_aux):
        W, b = self.W_enc.detach(), self.enc_bias()
        n = self.cfg.k * xs.shape[0] * self.world  # B*k over the global batch
        gather = self.world_gather if self.world > 1 else None
        flat, pre_vals, aux_vals, aux_idx, cutoff = sparse.batch_topk_select(
            xs, W, b, n, CANDIDATES * self.cfg.k, dead_idx, k_aux, gather, self.cutoff_hint
        )
        # the next batch's cut-off is near this one: a guess a little below it spares recomputing rows (it changes
        # how fast the selection is found, never what it is)
        self.cutoff_hint = HINT_MARGIN * cutoff.item()
        codes, order = sparse.flat_codes(flat, xs.shape[0], self.d_sae)
        aux = (sparse.topk_codes(aux_idx, self.d_sae), aux_vals.reshape(-1)) if k_aux else (None, None)
        return codes, pre_vals[order], *aux

    def _extra(self, vals):
        kept = vals[vals > 0]
        smallest = kept.min().detach() if kept.numel() else vals.new_tensor(math.inf)
        if self.world > 1:
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)  # the global batch's smallest kept value
        return {"min_kept": smallest if smallest.isfinite() else vals.new_zeros(())}

    @torch.no_grad()
    def after_step(self, extra, l0, lr):
        batch_min = extra["min_kept"].to(self.threshold) / self.world  # each rank's value, summed over the ranks
        # a plain running mean until it would move slower than the EMA, so the start does not linger
        self.threshold_updates += 1
        self.threshold.lerp_(batch_min, max(self.cfg.threshold_rate, 1 / self.threshold_updates.item()))

    def inference_tensors(self):
        return {**super().inference_tensors(), "threshold": self.threshold.clamp_min(0).expand(self.d_sae)}

    def set_inference_tensors(self, t):
        super().set_inference_tensors({k: v for k, v in t.items() if k != "threshold"})
        self.threshold.fill_(t["threshold"].mean())
        self.threshold_updates.fill_(math.ceil(1 / self.cfg.threshold_rate))  # the EMA goes on, not from scratch


class GatedSAE(TrainingSAE):
    """Gated (Rajamanoharan et al. 2024): π_gate = (x - b_dec) W_enc + b_gate decides which latents fire,
    π_mag = (x - b_dec)(W_enc ⊙ exp(r_mag)) + b_mag how strongly: f = 1[π_gate > 0] relu(π_mag).
    L = |x - x_hat|^2 + λ |relu(π_gate)|_1 + |x - (relu(π_gate) W_dec.detach() + b_dec.detach())|^2; the last
    (auxiliary) term reconstructs through the gate with a frozen decoder so the gate path gets a gradient.
    `dense_loss` is this definition; `loss` computes the same from the entries with π_gate > 0 alone (sparse codes)
    when they are few: f and relu(π_gate) are 0 elsewhere, with no gradient."""

    inference_architecture = "gated"
    enc_biases = ("b_gate", "b_mag", "r_mag")
    defaults = {"sparsity_coeff": 5.0, "resample": True, "grad_clip": 0.0, "beta1": 0.9, "normalize": True}

    def _paths(self, xs):
        z = (xs - self.b_dec) @ self.W_enc
        return z + self.b_gate, z * self.r_mag.exp() + self.b_mag

    def encode(self, xs):
        gate, mag = self._paths(xs)
        return (gate > 0) * F.relu(mag)

    def dense_loss(self, x: torch.Tensor, dead: torch.Tensor, sparsity_warmup: float) -> LossOut:
        """The definition of `loss` in dense (batch x d_sae) latents (the path while most gates are open)."""
        xs = x * self.input_scale
        target = xs
        gate, mag = self._paths(xs)
        f = (gate > 0) * F.relu(mag)
        err = (f @ self.W_dec + self.b_dec - target).pow(2).sum(-1)
        gate_act = F.relu(gate)
        sparsity = gate_act.sum(-1)
        aux = (gate_act @ self.W_dec.detach() + self.b_dec.detach() - target).pow(2).sum(-1)
        loss = (err + sparsity_warmup * self.sparsity_coeff * sparsity + aux).mean()
        return self._out(loss, err.sum(), (f > 0).sum(0), sparsity.mean())

    def loss(self, x, dead, sparsity_warmup, row_grads=None):
        xs = x * self.input_scale
        target = xs
        picked = self.firing(xs, self.b_gate, 0.0)
        if picked is None:
            return self.dense_loss(x, dead, sparsity_warmup)
        codes, gate_vals = picked
        gate = sparse.gather(xs, self.b_dec, self.W_enc, self.b_gate, codes, gate_vals, row_grads)  # > 0: = relu
        cols = codes.cols
        mag = (gate - self.b_gate[cols]) * self.r_mag.exp()[cols] + self.b_mag[cols]  # π_mag from the same z
        f = F.relu(mag)
        sse = sparse.squared_error(self.residual(codes, f, target, row_grads))
        sparsity = gate.sum()
        aux = sparse.squared_error(self.residual(codes, gate, target, frozen=True))
        loss = (sse + sparsity_warmup * self.sparsity_coeff * sparsity + aux) / len(x)
        return self._out(loss, sse, self.fired(codes, f), sparsity / len(x))

    def inference_tensors(self):
        return {
            "W_enc": self.W_enc,
            "b_gate": self.b_gate,
            "b_mag": self.b_mag,
            "r_mag": self.r_mag,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }


def _kernel(z, threshold, bandwidth):  # K((z - θ)/ε) with K(u) = 1[|u| < 1/2]
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """z H(z - θ); d/dθ = -(θ/ε) K((z - θ)/ε), d/dz = H(z - θ) + (θ/ε) K((z - θ)/ε): the jump's pseudo-derivative
    reaches z too (Anthropic 2025), so a latent just below its threshold learns when firing would help."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        d_threshold = -(threshold / ctx.bandwidth) * _kernel(z, threshold, ctx.bandwidth) * g
        return g * (z > threshold) - d_threshold, d_threshold.sum_to_size(threshold.shape), None


class _Step(torch.autograd.Function):
    """H(z - θ); d/dθ = -(1/ε) K((z - θ)/ε) and d/dz = -d/dθ (the L0 penalty also lowers z near the threshold)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        d_threshold = -(1 / ctx.bandwidth) * _kernel(z, threshold, ctx.bandwidth) * g
        return -d_threshold, d_threshold.sum_to_size(threshold.shape), None


class JumpReLUSAE(TrainingSAE):
    """JumpReLU (Rajamanoharan et al. 2024): f = z H(z - θ) with z = (x - b_dec) W_enc + b_enc and a learned
    threshold θ per latent (kept >= 0); L = |x - x_hat|^2 + λ |f|_0. H has no gradient, so both terms reach θ
    (and z) through straight-through estimators with a rectangle kernel of bandwidth ε (_JumpReLU, _Step).
    Anthropic's 2025 settings for inputs at E|x| = √d: ε = 2, θ0 = 0.1, gradients to z. θ moves by about one LR per
    step, so with target_l0 it starts where the initial encoder fires target_l0 latents per token.
    `dense_loss` is this definition; `loss` computes the same from the entries with z > θ - ε/2 alone (sparse codes)
    when they are few: every other entry has f = 0 and, outside the kernel's band, no gradient."""

    inference_architecture = "jumprelu"
    defaults = {"sparsity_coeff": 1.0, "resample": True, "grad_clip": 0.0, "beta1": 0.0, "normalize": True}

    def __init__(self, cfg, d_in, d_out=0):
        super().__init__(cfg, d_in, d_out)
        self.threshold = nn.Parameter(
            torch.full((self.d_sae,), 0.1 if self.cfg.init_threshold is None else self.cfg.init_threshold)
        )

    @torch.no_grad()
    def init_from_sample(self, x):
        super().init_from_sample(x)
        if self.cfg.init_threshold is None and self.cfg.target_l0:  # θ where the initial encoder fires target_l0
            z = self.pre_acts(self.split(x)[0]).flatten()
            self.threshold.fill_(z.topk(max(1, round(self.cfg.target_l0 * len(x)))).values[-1].clamp_min(0).item())

    def latent_params(self):
        return super().latent_params() + [(self.threshold, 0)]

    def encode(self, xs):
        z = self.pre_acts(xs)
        return z * (z > self.threshold)

    @torch.no_grad()
    def after_step(self, extra, l0, lr):
        super().after_step(extra, l0, lr)
        self.threshold.clamp_(min=0.0)

    def band_floor(self) -> torch.Tensor:
        """(d_sae,) the pre-activation above which an entry has a value or a gradient (f, or the kernel's band):
        θ - ε/2, a hair lower so that rounding cannot leave out an entry the kernel reaches (the kernel decides)."""
        return self.threshold.detach() - 0.501 * self.cfg.bandwidth

    def dense_loss(self, x: torch.Tensor, dead: torch.Tensor, sparsity_warmup: float) -> LossOut:
        """The definition of `loss` in dense (batch x d_sae) latents (the path while the band is wide)."""
        xs, target = self.split(x)
        z = self.pre_acts(xs)
        f = _JumpReLU.apply(z, self.threshold, self.cfg.bandwidth)
        err = (f @ self.W_dec + self.b_dec - target).pow(2).sum(-1)
        l0 = _Step.apply(z, self.threshold, self.cfg.bandwidth).sum(-1)
        loss = (err + sparsity_warmup * self.sparsity_coeff * l0).mean()
        return self._out(loss, err.sum(), (f > 0).sum(0), l0.mean())

    def loss(self, x, dead, sparsity_warmup, row_grads=None):
        xs, target = self.split(x)
        eps = self.cfg.bandwidth
        picked = self.firing(xs, self.b_enc, self.band_floor())
        if picked is None:
            return self.dense_loss(x, dead, sparsity_warmup)
        codes, pre_vals = picked
        z = sparse.gather(xs, self.enc_shift(), self.W_enc, self.b_enc, codes, pre_vals, row_grads)
        threshold = self.threshold[codes.cols]
        f = _JumpReLU.apply(z, threshold, eps)
        live = pre_vals > threshold.detach()  # f != 0; the rest, the band below θ, only carries the kernel's gradient
        e = self.residual(codes.subset(live), f[live], target, row_grads)
        sse = sparse.squared_error(sparse.probe(e, codes.subset(~live), -f[~live], self.W_dec.detach()))
        l0 = _Step.apply(z, threshold, eps).sum()
        loss = (sse + sparsity_warmup * self.sparsity_coeff * l0) / len(x)
        return self._out(loss, sse, self.fired(codes, f), l0 / len(x))

    def inference_tensors(self):
        return {**super().inference_tensors(), "threshold": self.threshold}


# ---------------------------------------------------------------------------------------------------------------
# crosscoders: two models A and B read at one site on the same tokens. A crosscoder is an SAE over the concatenation
# x = [a^A ; a^B] (d_in = 2d) whose decoder row i is [d_i^A ; d_i^B]: one shared encoder, one decoder per model
# (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing", transformer-circuits.pub).
# Decoder norms are free: the split of a latent's norm between the models is what model diffing reads.


def crosscoder_norms(W_dec: torch.Tensor) -> torch.Tensor:
    """(d_sae, 2): each latent's decoder norm in model A and in model B (W_dec (d_sae, 2d), A's half first)."""
    return W_dec.view(W_dec.shape[0], 2, -1).norm(dim=-1)


class CrosscoderSAE(BatchTopKSAE):
    """BatchTopK crosscoder (Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret
    Chat-Tuning", arXiv 2504.02922): the batch keeps the B*k largest f_i(x) (|d_i^A| + |d_i^B|), selection on
    decoder-norm-weighted latents, and no L1 (so neither model's decoder is pushed to zero). Inference keeps f_i where
    f_i (|d_i^A| + |d_i^B|) > θ (θ: the EMA of the smallest kept weighted value), saved as a JumpReLU SAE with the
    per-latent threshold θ / (|d_i^A| + |d_i^B|)."""

    unit_norm = False

    def __init__(self, cfg, d_in, d_out=0):
        if d_in % 2:
            raise NanosaeError(f"a crosscoder reads two models' activations side by side; d_in {d_in} is odd")
        super().__init__(cfg, d_in, d_out)
        self._min_score = torch.tensor(math.inf)

    def _weight(self) -> torch.Tensor:
        return crosscoder_norms(self.W_dec.detach()).sum(1).clamp_min(1e-12)

    def encode(self, xs):
        f = F.relu(self.pre_acts(xs))
        score = (f * self._weight()).flatten()
        keep = torch.zeros_like(score).scatter_(0, score.topk(min(self.cfg.k * xs.shape[0], score.numel())).indices, 1)
        return f * keep.view_as(f)

    def select(self, xs, dead_idx, k_aux):
        W = self.W_enc.detach()
        pre = torch.addmm(self.b_enc.detach() - self.b_dec.detach() @ W, xs, W)
        aux = pre.index_select(1, dead_idx).topk(k_aux, dim=-1) if k_aux else None  # AuxK reads the plain pre
        weight = self._weight()
        score = pre.relu_().mul_(weight).flatten()  # in place: pre is not needed after this
        n = self.cfg.k * xs.shape[0] * self.world  # B*k over the global batch
        top = score.topk(min(n, score.numel()), sorted=False)
        keep = top.values > 0
        if self.world > 1:  # as BatchTopKSAE: the global n-th largest weighted value is the cutoff
            everyone = self.world_gather(top.values)
            keep &= top.values >= everyone.topk(min(n, everyone.numel()), sorted=False).values.min()
        kept, values = top.indices[keep], top.values[keep]
        self._min_score = values.min() if values.numel() else values.new_tensor(math.inf)
        codes, order = sparse.flat_codes(kept, xs.shape[0], self.d_sae)
        pre_vals = (values / weight[kept % self.d_sae])[order]
        if aux is None:
            return codes, pre_vals, None, None
        return codes, pre_vals, sparse.topk_codes(dead_idx[aux.indices], self.d_sae), aux.values.reshape(-1)

    def _extra(self, vals):
        smallest = self._min_score.detach().to(vals)
        if self.world > 1:
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        return {"min_kept": smallest if smallest.isfinite() else vals.new_zeros(())}

    def inference_tensors(self):
        return {**super().inference_tensors(), "threshold": self.threshold.clamp_min(0) / self._weight()}


class CrosscoderL1SAE(AprilSAE):
    """L1 crosscoder (Lindsey et al. 2024): f = relu(x W_enc + b_enc), L = |x - x_hat|^2 + λ Σ_i f_i (|d_i^A| +
    |d_i^B|), the penalty weighted by the sum of the two decoder norms, free norms as in Anthropic's April-2024
    recipe. Minder et al. 2025 show that this penalty can shrink a latent's weaker decoder to zero (Complete
    Shrinkage) and split one concept into two model-specific latents (Latent Decoupling); Latent Scaling
    (nanosae.diff) flags such latents."""

    def __init__(self, cfg, d_in, d_out=0):
        if d_in % 2:
            raise NanosaeError(f"a crosscoder reads two models' activations side by side; d_in {d_in} is odd")
        super().__init__(cfg, d_in, d_out)

    def penalty(self, f):
        return f @ crosscoder_norms(self.W_dec).sum(1)


CROSSCODERS = ("crosscoder", "crosscoder_l1")


def crosscoder_side(cc: SAE, side: int, **meta) -> SAE:
    """One model's half of an inference crosscoder (d_in = 2d) as an ordinary SAE of width d for that model: the
    crosscoder fed that model's activations on both inputs, x -> [x ; x] (exact for encode(x) of the full crosscoder
    on [x ; x]; the other model's actual activations are not at hand). Its decoder is that model's decoder.
    pre = (x - b_A) W_A + (x - b_B) W_B + b = (x - b_s)(W_A + W_B) + b + Σ_m (b_s - b_m) W_m."""
    d = cc.cfg.d_in // 2
    W, b = cc.W_enc.detach(), cc.b_dec.detach()
    halves, b_halves = W.view(2, d, -1), b.view(2, d)
    b_s = b_halves[side]
    tensors = {
        "W_enc": halves.sum(0),
        "W_dec": cc.W_dec.detach()[:, side * d : (side + 1) * d],
        "b_dec": b_s,
        "b_enc": cc.b_enc.detach() + sum((b_s - b_halves[m]) @ halves[m] for m in range(2)),
    }
    if cc.cfg.architecture == "jumprelu":
        tensors["threshold"] = cc.threshold.detach()
    cfg = dataclasses.replace(cc.cfg, d_in=d, **meta)
    sae = SAE(cfg).to(cc.device)
    sae.load_state_dict({k: v.contiguous() for k, v in tensors.items()})
    return sae


TRAINING_CLASSES: dict[str, type[TrainingSAE]] = {
    "standard": StandardSAE,
    "april": AprilSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
    "crosscoder": CrosscoderSAE,
    "crosscoder_l1": CrosscoderL1SAE,
}


def recipe_of(sae: SAE) -> SAETrainConfig:
    """The training recipe of a saved SAE (from its cfg.json's record; else its architecture's defaults), to
    fine-tune it with."""
    rec = sae.cfg.training or {}
    names = {f.name for f in dataclasses.fields(SAETrainConfig)}
    if "arch" in rec:
        c = SAETrainConfig(**{k: v for k, v in rec.items() if k in names})
        c.matryoshka = tuple(c.matryoshka)
        if c.arch not in ("topk", "batchtopk") and rec.get("final_sparsity_coeff") is not None:
            c.sparsity_coeff = rec["final_sparsity_coeff"]  # where a target_l0 run's λ ended
        return c
    arch = {"topk": "topk", "jumprelu": "jumprelu", "standard": "standard", "gated": "gated"}.get(sae.cfg.architecture)
    if arch is None:
        raise NanosaeError(f"a {sae.cfg.architecture} SAE cannot be fine-tuned (nanosae trains no such architecture)")
    kind = ("skip_transcoder" if sae.cfg.skip else "transcoder") if sae.cfg.transcoder else "sae"
    return SAETrainConfig(arch=arch, kind=kind, d_sae=sae.cfg.d_sae, k=sae.cfg.k or 32)


def training_sae(cfg: SAETrainConfig, d_in: int, d_out: int = 0) -> TrainingSAE:
    """A freshly initialised training SAE (draws from torch's global RNG: seed it first)."""
    if cfg.arch not in TRAINING_CLASSES:
        raise NanosaeError(f"unknown training architecture {cfg.arch!r}; choose one of {', '.join(TRAINING_CLASSES)}")
    return TRAINING_CLASSES[cfg.arch](cfg, d_in, d_out)
