"""A1111's extra networks in the prompt: ``<lora:name:0.8>`` and ``<hypernet:name:1.0>``.

As A1111 (``extra_networks.parse_prompts``): every ``<kind:...>`` tag is removed from every prompt of a batch, and
the first prompt's tags apply to the whole batch. ``name`` is a file's stem, found in the folders given (and
their subfolders): LoRAs ``.safetensors`` / ``.pt`` / ``.ckpt`` (also a safetensors file's ``ss_output_name``,
A1111's alias), hypernetworks ``.pt``. LoRA arguments as A1111 reads them: ``<lora:name:te:unet>`` (the text
encoders' multiplier, default 1; the UNet's, default the first) or ``te=`` / ``unet=``; hypernetworks
``<hypernet:name:strength>``. A tag of another kind, a name not found, or a tag without its folder is an error
before any work.

``pipe.text_to_image("a cat <lora:style:0.8>", lora_dir="loras")`` (every task takes ``lora_dir=`` and
``hypernetwork_dir=``), or :func:`apply` for the pipeline and the prompts without tags.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdjax.prompts import extract_extra_networks

__all__ = ["Applied", "Network", "apply", "find", "parse", "with_networks"]

Folders = str | os.PathLike | Sequence[str | os.PathLike] | None
KINDS = {"lora": ("lora_dir", (".safetensors", ".pt", ".ckpt")), "hypernet": ("hypernetwork_dir", (".pt",))}


@dataclasses.dataclass(frozen=True)
class Network:
    """One tag, resolved: ``name`` as written in the prompt, ``path`` the file, and its multipliers."""

    kind: str  # "lora" or "hypernet"
    name: str
    path: Path
    te: float  # text encoders (LoRA); the strength of a hypernetwork
    unet: float

    def short_hash(self) -> str:
        """The hash A1111 records (``Lora hashes``: 12 digits, kohya's addnet hash for safetensors); the
        hypernetwork's 10-digit file hash."""
        from sdjax.hashes import lora_short_hash, short_hash

        return lora_short_hash(self.path) if self.kind == "lora" else short_hash(self.path)

    @property
    def label(self) -> str:
        """The name as A1111 writes it in ``Lora hashes`` (``:`` and ``,`` removed)."""
        return self.name.replace(":", "").replace(",", "")


@dataclasses.dataclass(frozen=True)
class Applied:
    pipe: Any  # the pipeline with the networks
    prompts: str | list[str]  # the prompts without their tags (a string stays a string)
    networks: tuple[Network, ...]


def _folders(value: Folders) -> list[Path]:
    if value is None:
        return []
    values = [value] if isinstance(value, str | os.PathLike) else list(value)
    return [Path(v) for v in values]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None


def _candidates(folders: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files with those suffixes in the folders and their subfolders, symlinked folders included (as A1111's
    ``os.walk(..., followlinks=True)``; a link back up the tree is walked once)."""
    found, seen = [], set()
    for folder in folders:
        for root, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            found += [Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in suffixes]
    return found


def find(kind: str, name: str, folders: Folders, option: str | None = None) -> Path:
    """The file of ``<kind:name>`` in ``folders`` (searched with their subfolders), as A1111 names it.
    ``option``: how errors name the folder option (default the keyword, ``lora_dir=``)."""
    keyword, suffixes = KINDS[kind]
    option = option or f"{keyword}="
    dirs = _folders(folders)
    tag = f"<{kind}:{name}>"
    if not dirs:
        raise ValueError(f"the prompt has {tag}: give {option} (the folder of those files)")
    for folder in dirs:
        if not folder.is_dir():
            raise ValueError(f"{option.rstrip('=')} {str(folder)!r} is not a folder")
    candidates = _candidates(dirs, suffixes)
    matches = [p for p in candidates if p.stem == name]
    if not matches and kind == "lora":  # A1111's alias: the name the trainer wrote into the file
        from sdjax.hashes import safetensors_metadata

        matches = [p for p in candidates if p.suffix.lower() == ".safetensors"
                   and safetensors_metadata(p).get("ss_output_name") == name]
    if not matches:
        where = ", ".join(repr(str(d)) for d in dirs)
        raise ValueError(f"{tag} in the prompt: no {name}{'/'.join(suffixes)} in {option.rstrip('=')} {where}")
    if len(matches) > 1:
        raise ValueError(f"{tag} in the prompt: several files are named {name}: "
                         f"{', '.join(str(p) for p in matches)}")
    return matches[0]


def parse(prompts: str | Sequence[str], *, lora_dir: Folders = None, hypernetwork_dir: Folders = None,
          options: dict[str, str] | None = None) -> tuple[str | list[str], tuple[Network, ...]]:
    """(prompts without tags, the first prompt's networks resolved to files). Reads no weights. ``options``:
    kind -> how errors name its folder option (the command line's ``--lora-dir``)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    stripped, tags = [], None
    for text in texts:
        clean, found = extract_extra_networks(text)
        stripped.append(clean)
        tags = found if tags is None else tags
    networks = []
    folders = {"lora": lora_dir, "hypernet": hypernetwork_dir}
    for tag in tags or []:
        if tag.kind not in KINDS:
            raise ValueError(f"<{tag.kind}:{tag.name}> in the prompt: sdjax applies <lora:...> and <hypernet:...> "
                             f"tags only")
        what = f"<{tag.kind}:{':'.join((tag.name, *tag.args))}>"
        positional = [a for a in tag.args if "=" not in a]
        named = dict(a.split("=", 1) for a in tag.args if "=" in a)
        unknown = set(named) - ({"te", "unet"} if tag.kind == "lora" else set())
        if unknown:
            raise ValueError(f"{what}: unsupported argument(s) {', '.join(sorted(unknown))}")
        te = _number(positional[0], what) if positional else 1.0
        te = _number(named["te"], what) if "te" in named else te
        unet = _number(positional[1], what) if len(positional) > 1 and tag.kind == "lora" else te
        unet = _number(named["unet"], what) if "unet" in named else unet
        path = find(tag.kind, tag.name, folders[tag.kind], (options or {}).get(tag.kind))
        networks.append(Network(tag.kind, tag.name, path, te, unet))
    return (stripped[0] if isinstance(prompts, str) else stripped), tuple(networks)


_cache: dict[Any, tuple[Any, Any]] = {}  # (id(pipe), files and multipliers) -> (pipe, pipe with them): the last


def with_networks(pipe: Any, networks: Sequence[Network]) -> Any:
    """``pipe`` with the networks :func:`parse` found: LoRAs merged, hypernetworks added, in the tags' order.
    The last result is cached (one, so an SDXL host holds one merged copy of the weights)."""
    networks = tuple(networks)
    if not networks:
        return pipe
    key = (id(pipe), tuple((n.kind, str(n.path), n.path.stat().st_mtime_ns, n.te, n.unet) for n in networks))
    if key in _cache:
        return _cache[key][1]
    out = pipe
    loras = [n for n in networks if n.kind == "lora"]
    if loras:
        out = out.replace(params=_merged(out, loras))
    for n in networks:
        if n.kind == "hypernet":
            out = out.with_hypernetwork(n.path, strength=n.te)
    _cache.clear()
    _cache[key] = (pipe, out)  # holding pipe keeps its id from being reused
    return out


def _merged(pipe: Any, loras: list[Network]) -> dict[str, Any]:
    """Params with the LoRAs merged, each component with its multiplier (A1111's te / unet)."""
    from sdjax.convert.lora import lora_deltas, merged_deltas, merged_lora_params

    if all(n.te == n.unet for n in loras):
        return merged_lora_params(pipe.params, [(n.path, n.te) for n in loras], unet_config=pipe.unet.config)
    total: dict[Any, Any] = {}
    for n in loras:
        for (component, path), delta in lora_deltas(pipe.params, n.path, 1.0, unet_config=pipe.unet.config).items():
            delta = delta * (n.unet if component == "unet" else n.te)
            key = (component, path)
            total[key] = total[key] + delta if key in total else delta
    return merged_deltas(pipe.params, total)


def apply(pipe: Any, prompts: str | Sequence[str], *, lora_dir: Folders = None, hypernetwork_dir: Folders = None
          ) -> Applied:
    """The pipeline with the prompt's LoRAs merged and hypernetworks added (in the tags' order), and the prompts
    without the tags. ``pipe`` is untouched; the last result is cached, so repeating a prompt merges once."""
    clean, networks = parse(prompts, lora_dir=lora_dir, hypernetwork_dir=hypernetwork_dir)
    return Applied(with_networks(pipe, networks), clean, networks)
