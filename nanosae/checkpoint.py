"""Find, load and save nanochat checkpoints in their real layout (spec §5).

<base>/tokenizer/{tokenizer.pkl, token_bytes.pt}
<base>/{base,chatsft,chatrl}_checkpoints/<tag>/model_<step:06d>.pt + meta_<step:06d>.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json, sha256_file
from .gpt import GENERATIONS, GPT, GPTConfig, detect_generation
from .tokenizer import Tokenizer

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
_MODEL_RE = re.compile(r"model_(\d+)\.pt")
_USAGE = "pass a checkpoint dir (…/base_checkpoints/d20), a nanochat base dir (~/.cache/nanochat) or a model_XXXXXX.pt"


@dataclass
class CheckpointFiles:
    model: Path
    meta: Path
    tokenizer_dir: Path
    tag: str
    step: int
    phase: str | None


@dataclass
class ModelInfo:
    """Where a loaded model came from; `name` is what SAE configs and exports call it (nanochat-d20)."""

    name: str
    path: str
    step: int
    phase: str | None
    generation: str
    fingerprint: str


def _steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(m[1]) for f in ckpt_dir.iterdir() if (m := _MODEL_RE.fullmatch(f.name)))


def _pick_tag(phase_dir: Path) -> Path:
    # nanochat's rule: the d<N> folder with the largest N, else the most recently modified folder
    dirs = [d for d in phase_dir.iterdir() if d.is_dir() and _steps(d)]
    if not dirs:
        raise NanosaeError(f"{phase_dir}: holds no checkpoint folder with model_XXXXXX.pt files")
    numbered = [(int(m[1]), d) for d in dirs if (m := re.match(r"d(\d+)", d.name))]
    if numbered:
        return max(numbered, key=lambda t: t[0])[1]
    return max(dirs, key=lambda d: d.stat().st_mtime)


def resolve(
    path: str | os.PathLike, step: int | None = None, phase: str | None = None, tokenizer_dir=None
) -> CheckpointFiles:
    """Turn a user's path (file, checkpoint dir or base dir) into the model, meta and tokenizer files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NanosaeError(f"{p}: no such file or directory; {_USAGE}")
    if phase is not None and phase not in PHASE_DIRS:
        raise NanosaeError(f"unknown phase {phase!r}; choose one of {', '.join(PHASE_DIRS)}")
    if p.is_file():
        m = _MODEL_RE.fullmatch(p.name)
        if not m:
            raise NanosaeError(f"{p}: not a nanochat model file (model_XXXXXX.pt); {_USAGE}")
        if step is not None and int(m[1]) != step:
            raise NanosaeError(f"{p}: is step {int(m[1])}, but step {step} was asked for")
        ckpt_dir, step = p.parent, int(m[1])
    else:
        if _steps(p):
            ckpt_dir = p
        else:
            present = [ph for ph, d in PHASE_DIRS.items() if (p / d).is_dir()]
            if not present:
                raise NanosaeError(f"{p}: no model_XXXXXX.pt and no {'/'.join(PHASE_DIRS.values())} inside; {_USAGE}")
            chosen = phase or present[0]
            if chosen not in present:
                raise NanosaeError(f"{p}: has no {PHASE_DIRS[chosen]} (phases present: {', '.join(present)})")
            ckpt_dir = _pick_tag(p / PHASE_DIRS[chosen])
        steps = _steps(ckpt_dir)
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise NanosaeError(f"{ckpt_dir}: no model_{step:06d}.pt (steps present: {', '.join(map(str, steps))})")
    model_file = ckpt_dir / f"model_{step:06d}.pt"
    meta_file = ckpt_dir / f"meta_{step:06d}.json"
    found_phase = next((ph for ph, d in PHASE_DIRS.items() if ckpt_dir.parent.name == d), None)
    candidates = (
        [Path(tokenizer_dir)] if tokenizer_dir else [ckpt_dir / "tokenizer", ckpt_dir.parent.parent / "tokenizer"]
    )
    tok = next((c for c in candidates if (c / "tokenizer.pkl").is_file()), None)
    if tok is None:
        looked = ", ".join(str(c) for c in candidates)
        raise NanosaeError(f"no tokenizer.pkl for {model_file} (looked in {looked}); pass --tokenizer DIR")
    return CheckpointFiles(model_file, meta_file, tok, ckpt_dir.name, step, found_phase)


def read_meta(path: Path) -> dict:
    """meta_*.json as nanochat writes it (Python json, so `Infinity` may appear: Python's parser accepts it)."""
    if not path.is_file():
        raise NanosaeError(f"{path}: missing; nanochat writes meta_XXXXXX.json beside each model_XXXXXX.pt")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise NanosaeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanosaeError(f"{path}: has no model_config; is this a nanochat meta file?")
    return meta


def _load_failure(e: Exception) -> str:
    msg = str(e)
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", msg):
        return f"refused: the pickle asks for {m[1]} besides tensors (nanosae loads weights only)"
    plain = "Weights only load failed" in msg or "zip archive" in msg or "invalid load key" in msg
    # damaged bytes fail in many ways inside the unpickler (EOFError, IndexError, ...): all of them mean the same
    first = msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__
    return "not a readable torch checkpoint (corrupt or truncated? copy it again" + (")" if plain else f"; {first})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # no mmap: parameters backed by the file would crash the process (SIGBUS) if the file were rewritten
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanosaeError(f"{path}: {_load_failure(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NanosaeError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def config_from_meta(meta: dict, meta_path: Path) -> GPTConfig:
    cfg = dict(meta["model_config"])
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(cfg) - fields
    missing = fields - set(cfg) - {"window_pattern"}
    if unknown or missing:
        raise NanosaeError(
            f"{meta_path}: model_config keys do not match nanochat's GPTConfig "
            f"(unknown: {sorted(unknown)}, missing: {sorted(missing)})"
        )
    cfg.setdefault("window_pattern", "L")
    bad = [k for k, v in cfg.items() if not (isinstance(v, str) if k == "window_pattern" else type(v) is int and v > 0)]
    if bad:
        raise NanosaeError(f"{meta_path}: model_config has invalid values for {bad}; is this file corrupted?")
    if cfg["n_embd"] % cfg["n_head"] or cfg["n_head"] % cfg["n_kv_head"]:
        raise NanosaeError(
            f"{meta_path}: n_embd must divide by n_head and n_head by n_kv_head; is this file corrupted?"
        )
    return GPTConfig(**cfg)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """nanochat's COMPUTE_DTYPE rule: bf16 on CUDA with SM >= 80, fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def build_model(
    sd: dict[str, torch.Tensor],
    config: GPTConfig,
    generation: str,
    device="cpu",
    dtype=torch.float32,
    where="",
) -> GPT:
    """A GPT holding `sd` (checked key by key and shape by shape), in compute `dtype` on `device`."""
    if generation not in GENERATIONS:
        raise NanosaeError(f"unknown generation {generation!r}; choose one of {', '.join(GENERATIONS)}")
    sd = dict(sd)
    if "transformer.wte.weight" not in sd:
        raise NanosaeError(f"{where}: no transformer.wte.weight; is this a nanochat checkpoint?")
    if GENERATIONS[generation].lambdas and "resid_lambdas" not in sd:  # nanochat patches these the same way
        sd["resid_lambdas"] = torch.ones(config.n_layer)
        sd["x0_lambdas"] = torch.zeros(config.n_layer)
    wte = sd["transformer.wte.weight"]
    padded_vocab = wte.shape[0] if wte.dim() == 2 else 0
    if padded_vocab < config.vocab_size:
        raise NanosaeError(
            f"{where}: transformer.wte.weight has shape {tuple(wte.shape)} but the meta says vocab_size "
            f"{config.vocab_size}; the model and meta files do not belong together"
        )
    try:
        with torch.device("meta"):
            model = GPT(config, generation, padded_vocab=padded_vocab)
    except NanosaeError as e:
        raise NanosaeError(f"{where}: {e}") from None
    expected = model.state_dict()
    unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unknown or missing:
        raise NanosaeError(
            f"{where}: keys do not fit a {generation!r} nanochat GPT with {config.n_layer} layers "
            f"(unexpected: {unknown[:4]}, missing: {missing[:4]}); check the checkpoint or --generation"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise NanosaeError(
                f"{where}: {k} has shape {tuple(sd[k].shape)} but the meta config implies {tuple(v.shape)}"
            )
    # assign=True swaps the meta tensors for the loaded ones (no to_empty: on meta it costs a second of imports)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}, assign=True)
    model.cos, model.sin = (t.to(device) for t in model._rope_tables(model.cos.size(1)))
    model.set_compute_dtype(dtype)
    model.eval().requires_grad_(False)
    return model


def model_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint file: size plus sha256 of its first 16 MiB (the scalars and embeddings)."""
    return f"{path.stat().st_size}-{sha256_file(path, limit=16 << 20)[:16]}"


def load_model(
    path: str | os.PathLike,
    step: int | None = None,
    *,
    phase: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    generation: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> tuple[GPT, Tokenizer, dict]:
    """Load a nanochat checkpoint: (model in eval mode, tokenizer, meta dict). The model carries `.info`."""
    files = resolve(path, step, phase, tokenizer_dir)
    meta = read_meta(files.meta)
    config = config_from_meta(meta, files.meta)
    sd = read_state_dict(files.model)
    gen = generation or detect_generation(sd, meta["model_config"])
    model = build_model(sd, config, gen, device, dtype or default_dtype(device), where=str(files.model))
    tokenizer = Tokenizer.from_dir(files.tokenizer_dir)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanosaeError(
            f"{files.tokenizer_dir / 'tokenizer.pkl'}: has {tokenizer.vocab_size} tokens but {files.meta} says "
            f"vocab_size {config.vocab_size}; use the tokenizer this model was trained with"
        )
    suffix = "" if files.phase in (None, "base") else f"-{files.phase}"
    model.info = ModelInfo(
        name=f"nanochat-{files.tag}{suffix}",
        path=str(files.model),
        step=files.step,
        phase=files.phase,
        generation=gen,
        fingerprint=model_fingerprint(files.model),
    )
    return model, tokenizer, meta


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: GPT, meta: dict) -> Path:
    """Write model_<step>.pt (plain fp32 state dict, nanochat's key order) and meta_<step>.json atomically."""
    ckpt_dir = Path(ckpt_dir)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path = atomic_write(ckpt_dir / f"model_{step:06d}.pt", lambda f: torch.save(sd, f))
    meta = {"step": step, **meta}
    meta.update(step=step, model_config=dataclasses.asdict(model.config))  # the caller's meta may be stale
    atomic_write_json(ckpt_dir / f"meta_{step:06d}.json", meta)
    return path
