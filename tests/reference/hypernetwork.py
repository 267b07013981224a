"""A PyTorch reference for AUTOMATIC1111 hypernetworks, written from the description of the format (issue 11):

- the file: ``torch.save`` of ``{width: (k_state_dict, v_state_dict), "layer_structure": [...],
  "activation_func": ..., "is_layer_norm": ..., "activate_output": ..., "use_dropout": ..., ...}``;
- a branch: ``x + f(x) * strength``, f a Sequential named ``linear`` of Linear ``dim*ls[i] -> dim*ls[i+1]``, each
  followed by the activation (torch's class of that lowercase name; "swish" = Hardswish; none after the last
  Linear unless ``activate_output``), then LayerNorm if ``is_layer_norm``, then Dropout where configured (nothing
  at inference);
- applied to the context of ``to_k`` / ``to_v`` in every attention whose context width has an entry, several
  hypernetworks one after the other: installed here as a diffusers attention processor.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

ACTIVATIONS = {"swish": torch.nn.Hardswish}
ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
                    if cls.__module__ == "torch.nn.modules.activation"})


class Branch(torch.nn.Module):
    def __init__(self, dim: int, layer_structure: list[float], activation: str | None, layer_norm: bool,
                 activate_output: bool, dropout: list[float]):
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i in range(len(layer_structure) - 1):
            d_out = int(dim * layer_structure[i + 1])
            layers.append(torch.nn.Linear(int(dim * layer_structure[i]), d_out))
            if activation not in (None, "linear") and (i < len(layer_structure) - 2 or activate_output):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(torch.nn.LayerNorm(d_out))
            if dropout[i + 1] > 0:
                layers.append(torch.nn.Dropout(dropout[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self.strength = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.strength


def make(widths: list[int], seed: int, *, layer_structure=(1, 2, 1), activation=None, layer_norm=False,
         activate_output=False, dropout=None, std=0.3) -> dict[int, tuple[Branch, Branch]]:
    """Random (k, v) branches per width (large enough weights that the effect is visible), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    dropout = list(dropout or [0.0] * len(layer_structure))
    out = {}
    for width in widths:
        pair = []
        for _ in range(2):
            branch = Branch(width, list(layer_structure), activation, layer_norm, activate_output, dropout).eval()
            with torch.no_grad():
                for name, p in branch.named_parameters():
                    noise = torch.randn(p.shape, generator=gen) * std
                    p.copy_(1.0 + noise if (name.endswith("weight") and p.ndim == 1 and layer_norm) else noise)
            pair.append(branch)
        out[width] = tuple(pair)
    return out


def save(path: Path, branches: dict[int, tuple[Branch, Branch]], **metadata: Any) -> Path:
    """Write an A1111-style hypernetwork file with torch.save."""
    data: dict[Any, Any] = {w: (k.state_dict(), v.state_dict()) for w, (k, v) in branches.items()}
    data.update(metadata)
    torch.save(data, path)
    return path


class HypernetworkAttnProcessor:
    """diffusers' plain attention (3-D inputs, no mask) with the hypernetworks on the k/v context."""

    def __init__(self, hypernetworks: list[tuple[dict[int, tuple[Branch, Branch]], float]]):
        self.hypernetworks = hypernetworks

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any):
        assert attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
        assert hidden_states.ndim == 3 and not attn.norm_cross and not attn.residual_connection
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in = v_in = context
        for branches, strength in self.hypernetworks:
            if context.shape[-1] in branches:
                k_branch, v_branch = branches[context.shape[-1]]
                k_branch.strength = v_branch.strength = strength
                k_in, v_in = k_branch(k_in), v_branch(v_in)
        key, value = attn.to_k(k_in), attn.to_v(v_in)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def install(unet: Any, hypernetworks: list[tuple[dict[int, tuple[Branch, Branch]], float]]) -> None:
    unet.set_attn_processor(HypernetworkAttnProcessor(hypernetworks))
