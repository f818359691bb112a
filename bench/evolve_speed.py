"""evolve's cost against its floor, measured side by side in one run over the same tokens.

The floor is C × (a forward stopped after the SAE's block + the SAE encode) over the token rows: the work no way
of looking at one SAE on C checkpoints can skip. The contender is nanosae.evolve.run_series end to end: loading
each checkpoint, the token rows, every metric (EV, L0, dead share, and CE/KL on the first tokens / 16 with three
full forwards each), per-latent density, mean activation, top contexts, the correlation with the reference's
sparse latents, and the results written to disk. It also runs with --ce-tokens 0, which shows the CE/KL share.
Timings are the best of --repeats alternating runs. The last line is `ratio: R` (evolve ÷ floor; the target is
≤ 1.3).

    .venv/bin/python bench/evolve_speed.py                       # tiny-model shape (4 layers, n_embd 192), 4 ckpts
    python bench/evolve_speed.py --device cuda --n-layer 20 --n-embd 1280 --layer 10 --d-sae 20480 --tokens 1M
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae import GPT, GPTConfig, Tokenizer, load_model  # noqa: E402
from nanosae.checkpoint import save_checkpoint  # noqa: E402
from nanosae.evolve import EvolveConfig, run_series, series, token_rows_for  # noqa: E402
from nanosae.hooks import run_with_cache  # noqa: E402
from nanosae.sae import SAE, SAEConfig  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"


def make_series(base: Path, a) -> None:
    """C checkpoints of one random model shape, each with its own weights, in nanochat's layout."""
    shutil.copytree(FIXTURE / "tokenizer", base / "tokenizer")
    vocab = Tokenizer.from_dir(base / "tokenizer").vocab_size
    cfg = GPTConfig(2048, vocab, a.n_layer, max(1, a.n_embd // 64), max(1, a.n_embd // 64), a.n_embd, "L")
    for c in range(a.checkpoints):
        model = GPT(cfg)
        model.init_weights(seed=c)
        save_checkpoint(base / "base_checkpoints" / f"d{a.n_layer}", 100 * (c + 1), model, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        make_series(tmp / "base", a)
        ckpts = series(str(tmp / "base"))
        site = f"blocks.{a.layer}.resid_post"
        g = torch.Generator().manual_seed(0)
        sae = SAE(SAEConfig("topk", a.n_embd, a.d_sae, k=a.k, hook_name=site))
        with torch.no_grad():
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(a.d_sae, a.n_embd, generator=g), dim=-1))
            sae.W_enc.copy_(sae.W_dec.T)
        cfg = EvolveConfig(tokens=a.tokens, batch_size=a.batch_size, device=a.device)
        models = [load_model(c.path, device=a.device)[0] for c in ckpts]
        rows = token_rows_for(load_model(ckpts[0].path)[1], None, cfg, models[0].config.sequence_len)
        dev_sae = SAE(sae.cfg).to(a.device)
        dev_sae.load_state_dict(sae.state_dict())

        def sync():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()

        @torch.no_grad()
        def floor() -> float:
            sync()
            t = time.perf_counter()
            for model in models:
                for b in rows.split(a.batch_size):
                    dev_sae.encode(run_with_cache(model, b.to(a.device), [site])[1][site])
            sync()
            return time.perf_counter() - t

        def evolve(ce: int | None, n: int) -> float:
            t = time.perf_counter()
            run_series(ckpts, lambda i: sae, tmp / f"out{n}", dataclasses.replace(cfg, ce_tokens=ce))
            sync()
            return time.perf_counter() - t

        floor()  # warm-up
        times: dict[str, list[float]] = {"floor": [], "evolve": [], "evolve_no_ce": []}
        for n in range(a.repeats):
            times["floor"].append(floor())
            times["evolve"].append(evolve(None, 2 * n))
            times["evolve_no_ce"].append(evolve(0, 2 * n + 1))
        best = {k: min(v) for k, v in times.items()}
        print(
            f"{a.checkpoints} checkpoints of {a.n_layer} layers, n_embd {a.n_embd} on {a.device}; SAE topk d_sae "
            f"{a.d_sae} k {a.k} at {site}; {rows.numel():,} tokens per checkpoint ({a.tokens // 16:,} with CE/KL)"
        )
        for k, v in times.items():
            print(f"{k:13s} best {best[k]:.2f}s  (runs: {', '.join(f'{x:.2f}' for x in v)})")
        print(f"ratio without CE/KL: {best['evolve_no_ce'] / best['floor']:.3f}")
        print(f"ratio: {best['evolve'] / best['floor']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
