"""GPU check (needs CUDA): the fixture model and a random TopK SAE evaluated on CPU fp32 and on the GPU in fp32 and
bf16 must give the same SAEBench metrics (fp32 to 1e-3, bf16 to 5%). Exits 1 on a mismatch.

    python bench/gpu_parity.py
"""

import sys
from pathlib import Path

import torch

from nanosae import load_model
from nanosae.data import token_batches
from nanosae.evaluate import evaluate
from nanosae.sae import SAE, SAEConfig

BASE_DIR = Path(__file__).parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
KEYS = [
    ("reconstruction_quality", "explained_variance"),
    ("reconstruction_quality", "cossim"),
    ("sparsity", "l1"),
    ("model_performance_preservation", "ce_loss_with_sae"),
    ("model_performance_preservation", "ce_loss_score"),
    ("model_behavior_preservation", "kl_div_score"),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    model, tok, _ = load_model(BASE_DIR)
    rows = next(token_batches(tok, None, 8, 64, "val"))
    g = torch.Generator().manual_seed(6)
    sae = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=256, k=16, hook_name="blocks.1.resid_post"))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.2))

    def metrics(m):
        r = evaluate(sae, m, tok, rows, rows.numel(), ce_tokens=rows.numel(), batch_size=4, progress=False)
        return r["eval_result_metrics"]

    cpu, ok = metrics(model), True
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.05)):
        gpu = metrics(load_model(BASE_DIR, device="cuda", dtype=dtype)[0])
        for cat, key in KEYS:
            a, b = cpu[cat][key], gpu[cat][key]
            good = abs(a - b) <= tol * max(abs(a), 1e-12)
            ok &= good
            print(f"{str(dtype):15s} {key:22s} cpu {a:10.5f}  gpu {b:10.5f}  {'ok' if good else 'MISMATCH'}")
    print("parity: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
