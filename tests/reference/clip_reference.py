"""Tiny random-weight transformers CLIP text encoders: the PyTorch reference for sdjax's CLIP tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24, layer_norm_eps=1e-5)

# Configs shaped like the real ones, shrunk. SD 1.x and 2.x hub configs carry the legacy eos_token_id=2.
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(TINY, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sd2": dict(TINY, hidden_act="gelu", num_hidden_layers=2, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SDXL pair with the non-legacy rule: EOS is a real id inside the tiny vocabulary, not the largest one.
    "sdxl_l": dict(TINY, hidden_act="quick_gelu", bos_token_id=998, eos_token_id=500, pad_token_id=500),
    "sdxl_g": dict(TINY, hidden_act="gelu", hidden_size=40, num_attention_heads=5, intermediate_size=52,
                   bos_token_id=998, eos_token_id=500, pad_token_id=0, layer_norm_eps=1e-6),
}
WITH_PROJECTION = {"sd1": False, "sd2": False, "sdxl_l": False, "sdxl_g": True}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The transformers model for ``CONFIGS[name]`` with every weight random (norms and biases included)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(**CONFIGS[name])
    cls = CLIPTextModelWithProjection if WITH_PROJECTION[name] else CLIPTextModel
    model = cls(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "layer_norm" in key and key.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                # Large enough that a mistake in any weight shows well above the tolerance.
                p.copy_((0.5 if "embedding" in key else 0.2) * torch.randn_like(p))
    return model


def state_dict(model: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
    """``layout``: "prefixed" (``text_model.*``, hub folders) or "bare" (transformers >= 5.6 CLIPTextModel)."""
    out = {}
    for key, value in model.state_dict().items():
        bare = key.removeprefix("text_model.")
        keep_bare = layout == "bare" or bare == "text_projection.weight"
        out[bare if keep_bare else "text_model." + bare] = value.numpy().copy()
    return out


def random_ids(name: str, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Random ids with BOS first and the EOS at a different position per row, pads after it.

    Every row also holds a token that the wrong pooling rule would pick: id 2 (the legacy eos_token_id) and,
    for the non-legacy configs, ids above the EOS id (where argmax(ids) would land).
    """
    cfg = CONFIGS[name]
    rng = np.random.default_rng(seed)
    legacy = cfg["eos_token_id"] == 2
    eos = cfg["vocab_size"] - 1 if legacy else cfg["eos_token_id"]
    pad = eos if legacy else cfg["pad_token_id"]
    special = {eos, cfg["bos_token_id"], pad}
    ids = rng.integers(3, cfg["vocab_size"] - 1, size=(batch, length))
    ids = np.where(np.isin(ids, list(special)), 7, ids)
    ids[:, 0] = cfg["bos_token_id"]
    ids[:, 1] = 2
    for row in range(batch):
        end = [3, length // 2, length - 1][row % 3]
        ids[row, end] = eos
        ids[row, end + 1:] = pad
    return ids.astype(np.int64)


def run(model: torch.nn.Module, ids: np.ndarray) -> dict[str, Any]:
    """Reference outputs named as sdjax's ``CLIPTextOutput``."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        if isinstance(model, CLIPTextModelWithProjection):
            # The projection's input is the pooled output, which this output type does not return.
            pooled = model.text_model(torch.from_numpy(ids)).pooler_output
            text_embeds = out.text_embeds.numpy()
        else:
            pooled, text_embeds = out.pooler_output, None
    return {
        "hidden_states": [h.numpy() for h in out.hidden_states],
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooled": pooled.numpy(),
        "text_embeds": text_embeds,
    }
