"""LoRA files merged into a Pipeline's params: ``W += weight * scale * up @ down``.

Formats (detected per key, so one file may mix them):

- kohya / A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (SD 1.x/2.x text encoder), ``lora_te1_`` / ``lora_te2_``
  (SDXL's two encoders), each with ``.lora_down.weight``, ``.lora_up.weight`` and optionally ``.alpha``. The module
  name is the PyTorch module path with every ``.`` turned into ``_``; it is looked up among the target model's own
  module paths (never split by guessing). UNet names may be diffusers' (``down_blocks_0_attentions_0_...``) or the
  original LDM/SGM ones that kohya's SDXL trainer writes (``input_blocks_4_1_...``, ``middle_block_1_...``).
  Conv LoRAs (LoCon: a kxk ``lora_down`` and a 1x1 ``lora_up``) merge into conv kernels.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``text_encoder.`` and
  ``text_encoder_2.``), older diffusers' ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight`` and the
  attention-processor layout (``attn1.processor.to_q_lora.down.weight``). ``.alpha`` keys are honoured when present
  (as ComfyUI does; diffusers ignores them for this format); otherwise the ``lora_adapter_metadata`` that diffusers'
  ``save_lora_weights`` writes into the safetensors header gives ``lora_alpha`` / ``alpha_pattern`` /
  ``use_rslora``; with neither, the scale is 1.

``scale = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA). Every problem in a file (unknown keys, modules the
model does not have, shape mismatches, unsupported LoRA variants) is reported together in one :class:`LoraError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdjax.convert.safe_load import read_checkpoint
from sdjax.convert.weights import flatten, torch_key_to_path, unflatten

ModulePath = tuple[str, ...]
LoraSource = str | os.PathLike | Mapping[str, Any]

if TYPE_CHECKING:
    from sdjax.pipeline import Pipeline

__all__ = ["LoraError", "apply_lora", "lora_deltas", "merged_lora_params"]

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_COMPONENT_TITLES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))

# diffusers' layouts over the years (PEFT last); the first suffix that matches names the part.
_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention-processor layout: to_q_lora.down
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# Old attention-processor LoRA names -> the module they wrap, per component kind.
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# Key fragments of LoRA variants sdjax does not merge, with the name to report.
_UNSUPPORTED = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_", "LoHa"), ("lokr_", "LoKr"),
                ("lora_B.bias", "LoRA with bias"), (".diff", "full-weight difference"), ("oft_", "OFT"),
                ("lora_mid", "LoCon with Tucker decomposition"))

_TEXT_MODEL = "text_model."
_METADATA_KEY = "lora_adapter_metadata"
_MAX_LISTED = 20


class LoraError(ValueError):
    """A LoRA file that cannot be merged into the model; the message lists every problem found."""


@dataclasses.dataclass
class _Module:
    """One LoRA'd module as the file names it."""

    component: str
    name: str  # the module name in the file, without component prefix (kohya: underscored)
    kohya: bool
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Problems:
    unknown: list[str] = dataclasses.field(default_factory=list)
    unsupported: set[str] = dataclasses.field(default_factory=set)
    no_component: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    no_module: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unknown or self.unsupported or self.no_component or self.no_module or self.other)

    def describe(self, source: str) -> str:
        lines = [f"LoRA {source} cannot be merged into this model:"]
        if self.unsupported:
            lines.append(f"  unsupported LoRA variant ({', '.join(sorted(self.unsupported))}); sdjax merges plain "
                         "LoRA and LoCon only")
        for component, names in self.no_component.items():
            lines.append(f"  it targets the {_COMPONENT_TITLES[component]} ({component}), which this model does not "
                         f"have ({_listing(names)})")
        if self.no_module:
            lines.append(f"  modules this model does not have ({len(self.no_module)}; a LoRA for another model "
                         f"family?): {_listing(self.no_module)}")
        if self.unknown:
            lines.append(f"  keys that are not LoRA weights ({len(self.unknown)}): {_listing(self.unknown)}")
        lines.extend(f"  {line}" for line in self.other)
        return "\n".join(lines)


def _listing(items: Sequence[str]) -> str:
    shown = list(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown.append(f"... and {len(items) - _MAX_LISTED} more")
    return ", ".join(shown)


# --- reading -----------------------------------------------------------------------------------------------------


def _read(source: LoraSource) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(state dict, safetensors metadata, a name for messages)."""
    if isinstance(source, Mapping):
        return {str(k): _to_numpy(v) for k, v in source.items()}, {}, "(state dict)"
    if isinstance(source, str | os.PathLike):
        checkpoint = read_checkpoint(Path(source))
        return dict(checkpoint.state_dict), dict(checkpoint.metadata), str(source)
    raise TypeError(f"a LoRA must be a file path or a mapping of arrays, got {type(source).__name__}")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; go through float32 (numpy has no bfloat16 from torch)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _adapter_configs(metadata: Mapping[str, str], source: str) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` (PEFT ``LoraConfig`` per component, keys ``"unet.lora_alpha"``...)."""
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"LoRA {source}: corrupt {_METADATA_KEY} in the safetensors header ({e})") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        if component in _COMPONENTS and field:
            configs.setdefault(component, {})[field] = value
    return configs


def _parse(state_dict: Mapping[str, np.ndarray], problems: _Problems, unet_top: set[str]) -> list[_Module]:
    modules: dict[tuple[str, str, bool], _Module] = {}
    for key, value in state_dict.items():
        parsed = _parse_key(key, unet_top)
        if parsed is None:
            variant = next((name for fragment, name in _UNSUPPORTED if fragment in key), None)
            if variant is not None:
                problems.unsupported.add(variant)
            else:
                problems.unknown.append(key)
            continue
        component, name, kohya, part = parsed
        module = modules.setdefault((component, name, kohya), _Module(component, name, kohya))
        module.keys.append(key)
        if getattr(module, part) is not None:
            problems.other.append(f"{key}: a second {part} weight for the same module")
        elif part == "alpha":
            module.alpha = float(np.asarray(value, np.float64).reshape(-1)[0])
        else:
            setattr(module, part, np.asarray(value))
    return list(modules.values())


def _parse_key(key: str, unet_top: set[str]) -> tuple[str, str, bool, str] | None:
    """(component, module name, is kohya, "down" | "up" | "alpha"), or None for a key that is no LoRA weight."""
    for prefix, component in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            for suffix, part in _KOHYA_SUFFIXES:
                if key.endswith(suffix) and "." not in key[len(prefix):-len(suffix)]:
                    return component, key[len(prefix):-len(suffix)], True, part
            return None
    component, rest = "unet", key
    head = key.split(".", 1)[0]
    if head in _COMPONENTS:
        component, rest = head, key[len(head) + 1:]
    elif head not in unet_top:  # diffusers' oldest files have UNet keys without "unet."
        return None
    for suffix, part in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            name = rest[:-len(suffix)].replace(".processor.", ".")
            if suffix.startswith("_lora."):
                parent, _, proc = name.rpartition(".")
                renames = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_TEXT
                if proc not in renames:
                    return None
                name = f"{parent}.{renames[proc]}"
            return component, name, False, part
    return None


# --- module lookup -----------------------------------------------------------------------------------------------


class _Targets:
    """The LoRA-able modules (those with a ``kernel``) of one component, by every name a LoRA may use."""

    def __init__(self, component: str, params: Mapping[str, Any], unet_config: Any = None):
        self.component = component
        self.kernels: dict[ModulePath, Any] = {p[:-1]: v for p, v in flatten(params).items() if p[-1] == "kernel"}
        self.underscored: dict[str, ModulePath | None] = {}
        for path in self.kernels:
            self._add("_".join(path), path)
            if component != "unet" and path[0] != "text_projection":
                self._add("text_model_" + "_".join(path), path)
        if component == "unet" and unet_config is not None:
            for name, path in _ldm_unet_names(self.kernels, unet_config).items():
                self._add(name, path)

    def _add(self, name: str, path: ModulePath) -> None:
        if name in self.underscored and self.underscored[name] != path:
            self.underscored[name] = None  # two modules flatten to the same name: refuse to pick one
        else:
            self.underscored[name] = path

    def resolve(self, module: _Module) -> ModulePath | str:
        """The module's Flax path, or why it has none."""
        if module.kohya:
            path = self.underscored.get(module.name)
            if path is None and module.name in self.underscored:
                return f"{module.name} (ambiguous: several modules have this name with '.' read as '_')"
            return path if path is not None else module.name
        name = module.name
        if self.component != "unet" and name.startswith(_TEXT_MODEL):
            name = name[len(_TEXT_MODEL):]
        path = torch_key_to_path(name)
        return path if path in self.kernels else module.name


def _ldm_unet_names(kernels: Mapping[ModulePath, Any], unet_config: Any) -> dict[str, ModulePath]:
    """LDM/SGM module names (underscored, as kohya writes them for SDXL) -> Flax module paths."""
    from sdjax.convert.single_file import unet_module_table  # the LDM <-> diffusers block table, shared

    config = dataclasses.asdict(unet_config) if dataclasses.is_dataclass(unet_config) else dict(unet_config)
    try:
        table = unet_module_table(config)
    except ValueError:  # a UNet layout single-file loading does not know has no LDM names either
        return {}
    names: dict[str, ModulePath] = {}
    for ldm_prefix, (diffusers_prefix, renames) in table.items():
        base = torch_key_to_path(diffusers_prefix)
        ldm = ldm_prefix.replace(".", "_")
        for path in kernels:
            if path[:len(base)] != base:
                continue
            inner = path[len(base):]
            if renames is None:
                names["_".join((ldm,) + inner)] = path
                continue
            for old, new in renames.items():
                new_path = torch_key_to_path(new)
                if inner[:len(new_path)] == new_path:
                    names["_".join((ldm, old.replace(".", "_")) + inner[len(new_path):])] = path
    return names


# --- merging -----------------------------------------------------------------------------------------------------


def _scale(module: _Module, rank: int, config: Mapping[str, Any] | None) -> float:
    if module.alpha is not None:
        return module.alpha / rank
    if not config:
        return 1.0
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module.name):  # PEFT's own pattern rule
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _delta(down: np.ndarray, up: np.ndarray) -> np.ndarray | str:
    """``up @ down`` in PyTorch layout: (out, in) or (out, in, kh, kw); or why the pair does not fit."""
    down, up = down.astype(np.float32), up.astype(np.float32)
    if down.ndim < 2 or down.shape[0] == 0:
        return f"lora_down has shape {down.shape}; expected (rank, in[, kh, kw]) with rank > 0"
    if down.ndim == 2 and up.ndim == 2:
        if up.shape[1] != down.shape[0]:
            return f"lora_up {up.shape} and lora_down {down.shape} have different ranks"
        return up @ down
    if down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1):
        if up.shape[1] != down.shape[0]:
            return f"lora_up {up.shape} and lora_down {down.shape} have different ranks"
        return np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    return f"unsupported LoRA shapes: lora_down {down.shape}, lora_up {up.shape}"


def _to_kernel_layout(delta: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray | None:
    """PyTorch-layout delta -> the Flax kernel's layout, or None when it does not fit the kernel."""
    if len(kernel_shape) == 2:  # Dense (in, out); PyTorch may hold it as Linear or as a 1x1 conv
        if delta.ndim == 4 and delta.shape[2:] == (1, 1):
            delta = delta[:, :, 0, 0]
        out = delta.T if delta.ndim == 2 else None
    elif len(kernel_shape) == 4:  # Conv HWIO
        if delta.ndim == 2:
            delta = delta[:, :, None, None]
        out = delta.transpose(2, 3, 1, 0)
    else:
        out = None
    return out if out is not None and out.shape == tuple(kernel_shape) else None


def lora_deltas(
    params: Mapping[str, Any], source: LoraSource, weight: float = 1.0, *, unet_config: Any = None
) -> dict[tuple[str, ModulePath], np.ndarray]:
    """The weight changes one LoRA makes to a model's ``params`` (component -> params tree; ``unet_config``: its
    UNetConfig, for kohya/LDM block names): ``(component, Flax module path) -> delta`` in the kernel's layout
    (float32), already multiplied by ``weight`` and the LoRA's scale. Raises :class:`LoraError` on any problem."""
    state_dict, metadata, name = _read(source)
    problems = _Problems()
    unet_params = params.get("unet", {})
    # Top-level UNet module names in PyTorch spelling ("down_blocks_0" -> "down_blocks") for unprefixed keys.
    unet_top = {re.sub(r"_\d+$", "", k) for k in unet_params} if isinstance(unet_params, Mapping) else set()
    modules = _parse(state_dict, problems, unet_top)
    configs = _adapter_configs(metadata, name)
    if any(config.get("use_dora") for config in configs.values()):
        problems.unsupported.add("DoRA")
    if not modules and not problems:
        raise LoraError(f"LoRA {name}: the file holds no weights")
    if not modules:
        if problems.unknown and not problems.unsupported:
            raise LoraError(f"{name} is not a LoRA file: none of its {len(state_dict)} keys is a LoRA weight "
                            f"(e.g. {_listing(problems.unknown[:5])}); expected kohya keys (lora_unet_*.lora_down"
                            ".weight, ...) or diffusers/PEFT keys (unet.*.lora_A.weight, ...)")
        raise LoraError(problems.describe(name))

    targets: dict[str, _Targets] = {}
    deltas: dict[tuple[str, ModulePath], np.ndarray] = {}
    for module in modules:
        label = module.keys[0].rsplit(".", 2)[0] if module.kohya else f"{module.component}.{module.name}"
        if module.component not in params:
            problems.no_component.setdefault(module.component, []).append(label)
            continue
        if module.down is None or module.up is None:
            missing = "lora_down/lora_A" if module.down is None else "lora_up/lora_B"
            problems.other.append(f"{label}: no {missing} weight")
            continue
        if module.component not in targets:
            config = unet_config if module.component == "unet" else None
            targets[module.component] = _Targets(module.component, params[module.component], config)
        found = targets[module.component].resolve(module)
        if isinstance(found, str):
            problems.no_module.append(f"{module.component}: {found}")
            continue
        delta = _delta(module.down, module.up)
        if isinstance(delta, str):
            problems.other.append(f"{label}: {delta}")
            continue
        kernel_shape = tuple(targets[module.component].kernels[found].shape)
        fitted = _to_kernel_layout(delta, kernel_shape)
        if fitted is None:
            problems.other.append(
                f"{label}: the LoRA changes a weight of shape {delta.shape} (PyTorch layout), but the model's "
                f"{'/'.join(found)} kernel is {kernel_shape} (Flax layout); a LoRA for another model family?")
            continue
        scale = _scale(module, module.down.shape[0], configs.get(module.component))
        key = (module.component, found)
        contribution = np.float32(weight * scale) * fitted
        deltas[key] = deltas[key] + contribution if key in deltas else contribution
    if problems:
        raise LoraError(problems.describe(name))
    return deltas


def _merged_leaf(old: Any, delta: np.ndarray) -> Any:
    merged = (np.asarray(old).astype(np.float32) + delta).astype(np.asarray(old).dtype)
    if isinstance(old, np.ndarray):
        return merged
    import jax  # a jax.Array: keep it on the devices (and sharding) it was on

    return jax.device_put(merged, getattr(old, "sharding", None))


def _check_loras(loras: Iterable[Any]) -> list[tuple[LoraSource, float]]:
    checked = []
    for item in loras:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"each LoRA must be a (source, weight) pair, got {item!r}")
        source, weight = item
        if isinstance(weight, bool) or not isinstance(weight, int | float | np.floating | np.integer):
            raise TypeError(f"LoRA weight must be a number, got {weight!r} for {source!r}")
        checked.append((source, float(weight)))
    return checked


def apply_lora(pipe: Pipeline, loras: Sequence[tuple[LoraSource, float]]) -> Pipeline:
    """A new Pipeline with the LoRAs merged into its params: ``W += weight * scale * up @ down`` per LoRA.

    ``loras`` is a sequence of ``(source, weight)``: ``source`` a ``.safetensors`` / ``.pt`` file or a state dict
    (key -> array). ``pipe`` and its arrays are left untouched; unchanged leaves are shared with it.
    Raises :class:`LoraError` listing every key or module of a LoRA that does not fit the model.
    """
    return pipe.replace(params=merged_lora_params(pipe.params, loras, unet_config=pipe.unet.config))


def merged_lora_params(
    params: Mapping[str, Any], loras: Sequence[tuple[LoraSource, float]], *, unet_config: Any = None
) -> dict[str, Any]:
    """``params`` (component -> params tree) with the LoRAs merged in, as :func:`apply_lora`; a new dict whose
    unchanged leaves are shared with ``params``."""
    if isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], int | float):
        raise TypeError("loras must be a sequence of (source, weight) pairs, e.g. [(path, 1.0)]")
    total: dict[tuple[str, ModulePath], np.ndarray] = {}
    for source, weight in _check_loras(loras):
        for key, delta in lora_deltas(params, source, weight, unet_config=unet_config).items():
            total[key] = total[key] + delta if key in total else delta
    return merged_deltas(params, total)


def merged_deltas(params: Mapping[str, Any], total: Mapping[tuple[str, ModulePath], np.ndarray]) -> dict[str, Any]:
    """``params`` with each ``(component, module path) -> delta`` added to that module's kernel; a new dict whose
    unchanged leaves are shared with ``params``."""
    params = dict(params)
    for component in {c for c, _ in total}:
        flat = flatten(params[component])
        for (c, path), delta in total.items():
            if c == component:
                flat[path + ("kernel",)] = _merged_leaf(flat[path + ("kernel",)], delta)
        params[component] = unflatten(flat)
    return params
