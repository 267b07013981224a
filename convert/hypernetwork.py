"""AUTOMATIC1111 hypernetworks (``.pt``): read, convert, and add to a Pipeline's UNet.

The file is a ``torch.save`` dict: integer context widths (768, 1024, 320, 640, 1280, ...) -> a pair of state
dicts (k branch, v branch) with keys ``linear.<i>.weight`` / ``linear.<i>.bias`` (i = index in the branch's
Sequential: Linear, activation, LayerNorm, Dropout; the oldest files say ``linear1`` / ``linear2``), plus metadata:
``layer_structure`` (default [1, 2, 1]), ``activation_func`` (default none), ``is_layer_norm``, ``activate_output``
(default true when absent, as A1111 reads it), ``use_dropout``, ``last_layer_dropout``, ``dropout_structure``,
``name``, ``step``, ... It is read only through torch's weights-only unpickler (``safe_load.load_pickle``).

:func:`apply_hypernetwork` gives a new Pipeline whose UNet runs the hypernetwork in every attention layer whose
context width has an entry (cross-attention on the text width, self-attention where the file has the channel
width); several chain in the order added, as A1111 applies several.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdjax.convert.safe_load import CheckpointError, load_pickle
from sdjax.models.hypernetwork import SUPPORTED_ACTIVATIONS, HypernetworkSpec

__all__ = ["HypernetworkError", "apply_hypernetwork", "read_hypernetwork"]

HypernetworkSource = str | os.PathLike | Mapping[Any, Any]
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetworkError(ValueError):
    """A hypernetwork file that cannot be read or does not fit the model."""


def _array(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise HypernetworkError(f"{where} is not a float tensor (dtype {array.dtype})")
    return array.astype(np.float32)


def _dropout_structure(data: Mapping[Any, Any], layer_structure: tuple[float, ...]) -> tuple[float, ...]:
    # As A1111's parse_dropout_structure: 0.3 after each hidden Linear but the last, which only with
    # last_layer_dropout; explicit dropout_structure wins.
    explicit = data.get("dropout_structure")
    if explicit is not None:
        return tuple(float(x) for x in explicit)
    use_dropout = bool(data.get("use_dropout", False))
    if not use_dropout:
        return (0.0,) * len(layer_structure)
    middle = [0.3] * (len(layer_structure) - 3)
    return (0.0, *middle, 0.3 if data.get("last_layer_dropout", False) else 0.0, 0.0)


def _branch_params(spec: HypernetworkSpec, width: int, state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One branch's state dict -> Flax params ``{"linear_<i>": {"kernel", "bias"} | {"scale", "bias"} | ...}``."""
    if not isinstance(state, Mapping):
        raise HypernetworkError(f"{where}: expected a state dict, got {type(state).__name__}")
    state = {_OLD_KEYS.get(k, k): v for k, v in state.items()}
    params: dict[str, Any] = {}
    expected: set[str] = set()
    for index, kind, d_in, d_out in spec.layers(width):
        key = f"linear.{index}"
        if kind == "linear":
            expected |= {f"{key}.weight", f"{key}.bias"}
            weight, bias = state.get(f"{key}.weight"), state.get(f"{key}.bias")
            if weight is None or bias is None:
                break  # reported below with the key lists
            weight, bias = _array(weight, f"{where} {key}.weight"), _array(bias, f"{where} {key}.bias")
            if weight.shape != (d_out, d_in) or bias.shape != (d_out,):
                raise HypernetworkError(
                    f"{where}: {key} has weight {weight.shape} / bias {bias.shape}; layer_structure "
                    f"{list(spec.layer_structure)} at width {width} needs ({d_out}, {d_in}) / ({d_out},)")
            params[f"linear_{index}"] = {"kernel": weight.T.copy(), "bias": bias}
        elif kind == "norm":
            expected |= {f"{key}.weight", f"{key}.bias"}
            if f"{key}.weight" in state and f"{key}.bias" in state:
                params[f"linear_{index}"] = {"scale": _array(state[f"{key}.weight"], f"{where} {key}.weight"),
                                             "bias": _array(state[f"{key}.bias"], f"{where} {key}.bias")}
        elif kind == "activation" and spec.activation == "prelu":
            expected.add(f"{key}.weight")
            if f"{key}.weight" in state:
                params[f"linear_{index}"] = {"weight": _array(state[f"{key}.weight"], f"{where} {key}.weight")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise HypernetworkError(
            f"{where}: the weights do not match the metadata (layer_structure {list(spec.layer_structure)}, "
            f"activation {spec.activation!r}, layer norm {spec.layer_norm}); missing {missing}, unexpected {extra}")
    return params


def read_hypernetwork(source: HypernetworkSource, *, name: str | None = None
                      ) -> tuple[HypernetworkSpec, dict[int, dict[str, Any]]]:
    """``(spec, {width: {"k": params, "v": params}})`` from an A1111 hypernetwork file (or the dict it holds)."""
    if isinstance(source, Mapping):
        data, what = source, "hypernetwork (dict)"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        what = f"hypernetwork {path}"
        if not path.is_file():
            raise HypernetworkError(f"{what}: no such file")
        try:
            data = load_pickle(path)
        except CheckpointError as e:
            raise HypernetworkError(f"hypernetwork {e}") from None
        name = name or path.stem
    else:
        raise TypeError(f"a hypernetwork must be a file path or a dict, got {type(source).__name__}")
    if not isinstance(data, Mapping):
        raise HypernetworkError(f"{what}: holds a {type(data).__name__}, not a dict")
    widths = sorted(k for k in data if isinstance(k, int) and not isinstance(k, bool))
    if not widths:
        raise HypernetworkError(f"{what}: no context widths (integer keys) found; keys are "
                                f"{sorted(map(str, data))[:10]}; is this an A1111 hypernetwork?")
    layer_structure = tuple(float(x) for x in (data.get("layer_structure") or (1, 2, 1)))
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise HypernetworkError(f"{what}: layer_structure {list(layer_structure)} must start and end with 1")
    activation = data.get("activation_func")
    activation = activation.lower() if isinstance(activation, str) else activation
    if activation not in SUPPORTED_ACTIVATIONS:
        raise HypernetworkError(f"{what}: unsupported activation_func {activation!r}; sdjax supports "
                                f"{', '.join(a for a in SUPPORTED_ACTIVATIONS if a)}")
    dropout = _dropout_structure(data, layer_structure)
    if len(dropout) != len(layer_structure):
        raise HypernetworkError(f"{what}: dropout_structure {list(dropout)} has not one entry per layer_structure "
                                f"entry {list(layer_structure)}")
    spec = HypernetworkSpec(
        name=str(data.get("name") or name or "hypernetwork"),
        widths=tuple(widths),
        layer_structure=layer_structure,
        activation=activation,
        layer_norm=bool(data.get("is_layer_norm", False)),
        activate_output=bool(data.get("activate_output", True)),
        dropout_structure=dropout,
    )
    params = {}
    for width in widths:
        pair = data[width]
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise HypernetworkError(f"{what}: entry {width} must be a (k, v) pair of state dicts")
        params[width] = {"k": _branch_params(spec, width, pair[0], f"{what} [{width}] k"),
                         "v": _branch_params(spec, width, pair[1], f"{what} [{width}] v")}
    return spec, params


def _attention_layers(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
    """(path, context width) of every attention module in UNet params: a dict with to_q and to_k."""
    if "to_q" in tree and "to_k" in tree:
        yield path, int(np.shape(tree["to_k"]["kernel"])[0])
        return
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _attention_layers(value, (*path, key))


def _with_hypernetwork(tree: Mapping[str, Any], slot: str, per_width: Mapping[int, Any]) -> tuple[dict, int]:
    if "to_q" in tree and "to_k" in tree:
        width = int(np.shape(tree["to_k"]["kernel"])[0])
        return ({**tree, slot: per_width[width]}, 1) if width in per_width else (dict(tree), 0)
    out, count = {}, 0
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key], n = _with_hypernetwork(value, slot, per_width)
            count += n
        else:
            out[key] = value
    return out, count


def apply_hypernetwork(pipe: Any, source: HypernetworkSource, strength: float = 1.0) -> Any:
    """A new Pipeline with the hypernetwork added after those it already has (this one is untouched).

    ``strength`` multiplies the MLP's output (A1111's multiplier; 0 = no effect). Raises
    :class:`HypernetworkError` when no attention layer of this UNet has a context width the file covers.
    """
    import jax.numpy as jnp

    strength = float(strength)
    spec, params = read_hypernetwork(source)
    widths = {w for _, w in _attention_layers(pipe.params["unet"])}
    if not widths & set(spec.widths):
        raise HypernetworkError(
            f"hypernetwork {spec.name!r} has entries for context widths {list(spec.widths)}, but this UNet's "
            f"attention layers have widths {sorted(widths)} (a hypernetwork for another model family?)")
    slot = f"hypernetwork_{len(pipe.unet.hypernetworks)}"
    # One device array per tensor, shared by every attention layer of that width (no copy per layer).
    per_width = {w: {"strength": jnp.asarray(strength, jnp.float32),
                     "k": _to_device(p["k"]), "v": _to_device(p["v"])} for w, p in params.items()}
    unet_params, _ = _with_hypernetwork(pipe.params["unet"], slot, per_width)
    unet = pipe.unet.clone(hypernetworks=(*pipe.unet.hypernetworks, spec))
    return pipe.replace(unet=unet, params={**pipe.params, "unet": unet_params})


def _to_device(tree: Mapping[str, Any]) -> dict[str, Any]:
    import jax

    return jax.tree.map(jax.numpy.asarray, dict(tree))
