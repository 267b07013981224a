"""Text-encoder layouts in single files: transformers' CLIPTextModel as embedded by LDM / SGM, and OpenCLIP
text towers (``transformer.resblocks.N``, fused ``in_proj``) <-> transformers' CLIPTextModel(WithProjection)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sdjax.convert.safe_load import CheckpointError
from sdjax.convert.single_file.common import _has_prefix, _preview, _require
from sdjax.convert.single_file.family import _Encoder


def _encoder_layers(encoder: _Encoder, weights: Mapping[str, Any]) -> int:
    prefix = "transformer.resblocks.{}." if encoder.openclip else "text_model.encoder.layers.{}."
    n = 0
    while _has_prefix(weights, prefix.format(n)) or (
            not encoder.openclip and _has_prefix(weights, f"encoder.layers.{n}.")):
        n += 1
    return n

_CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")

# Extras some files carry that CLIPTextModel has no place for: a buffer, and CLIP's contrastive-head leftovers.
_CLIP_IGNORED = ("embeddings.position_ids", "text_projection.weight", "logit_scale")

_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}

_OPENCLIP_LAYER = {  # inside transformer.resblocks.N (the fused attn.in_proj_* is split separately)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")

def convert_clip_text(weights: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel weights, with or without ``text_model.``, -> keys with ``text_model.``."""
    _require(config, ("num_hidden_layers",), "CLIP text encoder")
    out, unexpected = {}, []
    for key, value in weights.items():
        inner = key.removeprefix("text_model.")
        if inner in _CLIP_IGNORED:
            continue
        if not inner.startswith(_CLIP_TOP_LEVEL):
            unexpected.append(key)
            continue
        out["text_model." + inner] = value
    _check_clip_keys(out, unexpected, config["num_hidden_layers"], projection=False, what="CLIP text encoder")
    return out

def convert_openclip_text(
    weights: Mapping[str, Any], config: Mapping[str, Any], *, projection: bool, drop_extra_layers: bool = False
) -> dict[str, Any]:
    """OpenCLIP text tower weights (keys after ``...model.``) -> CLIPTextModel(WithProjection) state dict.

    ``drop_extra_layers`` drops resblocks beyond the config's ``num_hidden_layers``: SD 2.x conditions on the
    penultimate layer, so its 24-block OpenCLIP-H becomes a 23-layer CLIPTextModel (as diffusers does).
    """
    _require(config, ("num_hidden_layers",), "OpenCLIP text encoder")
    num_layers = config["num_hidden_layers"]
    out, unexpected = {}, []
    for key, value in weights.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = np.ascontiguousarray(np.asarray(value).T)  # x @ P == Linear(P.T)
        elif key.startswith("transformer.resblocks."):
            layer, _, inner = key.removeprefix("transformer.resblocks.").partition(".")
            if not layer.isdigit():
                unexpected.append(key)
                continue
            if int(layer) >= num_layers and drop_extra_layers:
                continue
            converted = _convert_openclip_layer(f"text_model.encoder.layers.{layer}", inner, value)
            if converted is None:
                unexpected.append(key)
            else:
                out.update(converted)
        elif key not in _OPENCLIP_IGNORED:
            unexpected.append(key)
    _check_clip_keys(out, unexpected, num_layers, projection=projection, what="OpenCLIP text encoder")
    return out

def _convert_openclip_layer(target: str, inner: str, value: Any) -> dict[str, Any] | None:
    if inner in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if inner.endswith("weight") else "bias"
        q, k, v = np.split(np.asarray(value), 3, axis=0)  # rows are [q; k; v]
        return {f"{target}.self_attn.{name}_proj.{leaf}": part for name, part in zip("qkv", (q, k, v), strict=True)}
    module, _, leaf = inner.rpartition(".")
    if module in _OPENCLIP_LAYER and leaf in ("weight", "bias"):
        return {f"{target}.{_OPENCLIP_LAYER[module]}.{leaf}": value}
    return None

def _clip_keys(num_layers: int, projection: bool) -> set[str]:
    """Every key of a transformers CLIPTextModel(WithProjection) state dict."""
    keys = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    layer_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    layer_modules += ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for n in range(num_layers):
        keys.update(f"text_model.encoder.layers.{n}.{m}.{leaf}" for m in layer_modules for leaf in ("weight", "bias"))
    if projection:
        keys.add("text_projection.weight")
    return keys

def _check_clip_keys(out: Mapping[str, Any], unexpected: list[str], num_layers: int, projection: bool, what: str):
    expected = _clip_keys(num_layers, projection)
    missing = sorted(expected - set(out))
    unexpected = unexpected + sorted(set(out) - expected)
    problems = [f"missing {_preview(missing)}"] if missing else []
    problems += [f"unexpected {_preview(unexpected)}"] if unexpected else []
    if problems:
        raise CheckpointError(f"{what} does not match its config ({num_layers} layers): " + "; ".join(problems))

def _convert_encoder(encoder: _Encoder, weights: Mapping[str, Any], config: Mapping[str, Any], family: str):
    if not encoder.openclip:
        return convert_clip_text(weights, config)
    return convert_openclip_text(
        weights, config, projection=encoder.projection, drop_extra_layers=family.startswith("sd2")
    )

def clip_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel state dict -> the embedded transformers keys LDM files use (``text_model.``)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items() if not k.startswith("text_projection")}

def openclip_to_ldm(state: Mapping[str, Any], *, extra_layer: bool = False) -> dict[str, Any]:
    """CLIPTextModel(WithProjection) state dict -> OpenCLIP text tower keys. ``extra_layer``: repeat the last
    resblock once more, as SD 2.x files carry OpenCLIP-H's 24th block, which SD 2.x (penultimate layer) skips."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    inverse_top = {v.removeprefix("text_model."): k for k, v in _OPENCLIP_TOP.items()}
    inverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, Any] = {}
    layers = 0
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif key.startswith("encoder.layers."):
            layer, _, inner = key.removeprefix("encoder.layers.").partition(".")
            layers = max(layers, int(layer) + 1)
            module, _, leaf = inner.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue  # fused below
            out[f"transformer.resblocks.{layer}.{inverse_layer[module]}.{leaf}"] = value
        else:
            raise CheckpointError(f"OpenCLIP text encoder: no place for {key} in the single-file layout")
    for n in range(layers):
        for leaf in ("weight", "bias"):
            parts = [np.asarray(state[f"encoder.layers.{n}.self_attn.{p}_proj.{leaf}"]) for p in "qkv"]
            out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = np.concatenate(parts, axis=0)
    if extra_layer and layers:
        last = f"transformer.resblocks.{layers - 1}."
        out.update({k.replace(last, f"transformer.resblocks.{layers}."): v for k, v in list(out.items())
                    if k.startswith(last)})
    return out
