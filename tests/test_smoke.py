import numpy as np
import torch


def test_fixture_logits_match_nanochat(d4, reference):
    model, _, _ = d4
    for i in range(3):
        with torch.no_grad():
            logits = model(torch.tensor(reference[f"seq{i}_ids"])[None])[0].numpy()
        assert np.abs(logits - reference[f"seq{i}_logits"]).max() <= 1e-4
