"""The Pipeline: configs, Flax modules, one params pytree and the tokenizers of a Stable Diffusion model.

``sdjax.load(path)`` builds one from a diffusers folder (or, via ``convert/``, a single-file checkpoint). The
generation methods (text-to-image, image-to-image, inpainting) all build one ``sdjax.generation.Request``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from sdjax.convert.clip import architectures_have_projection, convert_clip_text, has_projection
from sdjax.convert.unet import convert_unet
from sdjax.convert.vae import convert_vae
from sdjax.loading import pipeline_components, read_component_weights, read_model_index
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.config import ConfigError, read_json
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.samplers.schedules import SchedulerConfig
from sdjax.tokenizer import load_tokenizer

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZER_FOR = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    module: CLIPTextModel
    tokenizer: CLIPTokenizer

    @property
    def config(self) -> CLIPTextConfig:
        return self.module.config


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A loaded model. ``params`` maps component name ("unet", "vae", "text_encoder", "text_encoder_2") to a
    plain params pytree; everything else is static configuration."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: dict[str, TextEncoder]
    params: dict[str, Any]
    scheduler: SchedulerConfig
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    source: str = ""
    ip_adapters: tuple[Any, ...] = ()  # IP-Adapters whose kernels are in params["unet"] (with_ip_adapter), in order
    # Params already placed on a mesh's devices, by mesh (not copied by replace(): new params, new cache).
    device_params: dict[Any, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def replace(self, **changes: Any) -> Pipeline:
        return dataclasses.replace(self, **changes)

    def with_lora(self, source: Any, weight: float = 1.0) -> Pipeline:
        """A new pipeline with a LoRA merged into its params (kohya/A1111 or diffusers/PEFT layout, a path or a
        state dict); this one is untouched. Chain calls, or use ``sdjax.convert.lora.apply_lora`` for several."""
        from sdjax.convert.lora import apply_lora

        return apply_lora(self, [(source, weight)])

    def with_embeddings(self, source: Any, *, token: str | None = None) -> Pipeline:
        """A new pipeline with a textual-inversion embedding added as new token(s) (A1111 .pt/.safetensors,
        diffusers learned_embeds, SDXL clip_l/clip_g pairs); ``token`` defaults to the file's name."""
        from sdjax.convert.embeddings import apply_embeddings

        return apply_embeddings(self, source, token=token)

    # --- generation (the public API): all three tasks build one Request and run it --------------------------

    def text_to_image(
        self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
        num_steps: int = 30, guidance: Any = None, guidance_scale: Any = None, sampler: str = "euler",
        schedule: str | None = None, seed: int = 0, latents: Any = None, height: int | None = None,
        width: int | None = None, clip_skip: int | None = None, guidance_rescale: float = 0.0,
        eta: float | None = None, output: str = "np", **options: Any,
    ) -> Any:
        """Generate images from text. Returns (B, H, W, 3) float32 in [0, 1] (``output="np"``), a list of PIL
        images (``"pil"``) or the final latents in diffusers' (B, C, H/8, W/8) layout (``"latent"``).

        ``guidance``: a method from :mod:`sdjax.guidance` (``guidance.CFG(7.5)``, ``Interval``, ``APG``, ...);
        or the shorthand ``guidance_scale`` (default 7.5; <= 1 runs the conditional pass only) and
        ``guidance_rescale``. A list of scales (or a 1-D array in any numeric field of a method) is a sweep:
        the result gains a leading axis K, each k on the same noise.
        ``latents``: unscaled standard-normal starting noise in diffusers' layout (the same noise gives the
        same image as diffusers); height and width then default to the latents' size. Otherwise image i
        draws its noise from seed + i (the image that seed + i gives alone).
        ``options``: SDXL's ``prompt_2``, ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``,
        ``target_size`` (and their ``negative_`` forms), ``denoising_end`` (base -> refiner hand-off); for
        any model also ``progress`` (a ``(step, total)`` callback) and ``mesh`` (a Mesh with a "data" axis).
        ``eta``: None uses the sampler's own (DDIM 0; ancestral and SDE samplers 1, as diffusers).
        """
        return self._generate("text", _arguments(locals()))

    def image_to_image(
        self, prompt: str | list[str], image: Any, *, strength: float = 0.8,
        negative_prompt: str | list[str] | None = None, num_steps: int = 30, guidance: Any = None,
        guidance_scale: Any = None, sampler: str = "euler", schedule: str | None = None, seed: int = 0,
        latents: Any = None, clip_skip: int | None = None, guidance_rescale: float = 0.0, eta: float | None = None,
        output: str = "np", **options: Any,
    ) -> Any:
        """Re-draw ``image`` (PIL image(s) or an array in [0, 1]) guided by ``prompt``; ``strength`` picks how
        much of the schedule runs (1.0 = all of it). ``image`` may also be latents in diffusers' layout, e.g.
        an SDXL base's ``output="latent"`` for the refiner with ``denoising_start``; SDXL's refiner also takes
        ``aesthetic_score`` / ``negative_aesthetic_score``. Returns as :meth:`text_to_image`."""
        return self._generate("image", _arguments(locals()))

    def inpaint(
        self, prompt: str | list[str], image: Any, mask: Any, *, strength: float = 1.0,
        negative_prompt: str | list[str] | None = None, num_steps: int = 30, guidance: Any = None,
        guidance_scale: Any = None, sampler: str = "euler", schedule: str | None = None, seed: int = 0,
        latents: Any = None, clip_skip: int | None = None, guidance_rescale: float = 0.0, eta: float | None = None,
        output: str = "np", **options: Any,
    ) -> Any:
        """Repaint the white part of ``mask`` (same size as ``image``). Works with 9-channel inpainting UNets
        (mask and masked image as extra inputs) and with ordinary UNets (the original is re-imposed outside
        the mask after every step). Returns as :meth:`text_to_image`."""
        return self._generate("inpaint", _arguments(locals()))

    def _generate(self, task: str, options: dict[str, Any]) -> Any:
        from sdjax.generation import Request, run

        extra = options.pop("options")
        execution = {k: extra.pop(k) for k in ("progress", "mesh", "image_index_offset") if k in extra}
        request = Request.build(task, options.pop("prompt"), **options, **extra)
        pipe = self
        for adapter in request.ip_adapter.adapters if request.ip_adapter else ():
            if not any(adapter is a for a in pipe.ip_adapters):
                pipe = pipe.with_ip_adapter(adapter)  # params for this call (prefer with_ip_adapter once)
        return run(pipe, request, **execution)

    def encode_prompt(self, prompt: Any, negative_prompt: Any = None, clip_skip: int | None = None,
                      **options: Any) -> Any:
        """Prompt embeddings in diffusers' layout (``sdjax.text.encode_prompt``: ``prompt_2``, ``negative_prompt_2``,
        ``num_images_per_prompt``, ``emphasis``); A1111's prompt syntax, any length."""
        from sdjax.text import encode_prompt

        return encode_prompt(self, prompt, negative_prompt, clip_skip, **options)

    def with_hypernetwork(self, path: Any, strength: float = 1.0) -> Pipeline:
        """A new pipeline with an A1111 hypernetwork (.pt) in its UNet's attention; chain calls for several."""
        from sdjax.convert.hypernetwork import apply_hypernetwork

        return apply_hypernetwork(self, path, strength)

    def with_ip_adapter(self, source: Any, *, image_encoder: Any = None, scale: float = 1.0) -> Pipeline:
        """A new pipeline with an IP-Adapter's decoupled cross-attention in its UNet (chain calls for several);
        ``source``: an ``ip-adapter*.safetensors`` / ``.bin`` file (``image_encoder``: the CLIP vision folder,
        e.g. h94's ``models/image_encoder``, or a loaded one) or an adapter from ``sdjax.load_ip_adapter``.
        Every task then needs ``ip_adapter_image=`` (one entry per adapter); ``ip_adapter_scale=`` overrides
        ``scale`` per call without a recompile."""
        from sdjax.ip_adapter import IPAdapter, load_ip_adapter, with_ip_adapters

        if isinstance(source, IPAdapter):
            if isinstance(image_encoder, str | Path):
                from sdjax.ip_adapter import load_image_encoder

                image_encoder = load_image_encoder(image_encoder, dtype=self.unet.dtype)
            adapter = source if image_encoder is None else dataclasses.replace(source, image_encoder=image_encoder)
        else:
            adapter = load_ip_adapter(source, self.unet.config, image_encoder=image_encoder, scale=scale,
                                      dtype=self.unet.dtype)
        adapters = (*self.ip_adapters, adapter)
        # The kernels are named by adapter position (to_k_ip_0, ...): re-adding the earlier ones is a no-op.
        unet = with_ip_adapters(self.params["unet"], list(adapters))
        return self.replace(params={**self.params, "unet": unet}, ip_adapters=adapters)


def _arguments(scope: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scope.items() if k != "self"}


def _tokenizer_convention(name: str, config: CLIPTextConfig) -> str:
    # SD1 and SDXL's first encoder are OpenAI CLIP (quick_gelu, pads with <|endoftext|>); SD2's encoder and
    # SDXL's second are OpenCLIP (gelu, pads with "!").
    return "openclip" if name == "text_encoder_2" or config.hidden_act == "gelu" else "clip"


def assemble(
    *,
    configs: dict[str, dict[str, Any]],
    params: dict[str, Any],
    scheduler_config: dict[str, Any],
    tokenizers: dict[str, CLIPTokenizer],
    projections: dict[str, bool],
    dtype: Any = jnp.float32,
    force_zeros_for_empty_prompt: bool = False,
    requires_aesthetics_score: bool = False,
    source: str = "",
) -> Pipeline:
    """A Pipeline from component config dicts and params already in sdjax's layout."""
    for needed in ("unet", "vae"):
        if needed not in params:
            raise ConfigError(f"{source}: the model has no {needed}")
    vae_config = VAEConfig.from_dict(configs["vae"])
    text_encoders = {
        name: TextEncoder(CLIPTextModel(CLIPTextConfig.from_dict(configs[name]), with_projection=projections[name],
                                        dtype=dtype), tokenizers[name])
        for name in TEXT_ENCODERS if name in params
    }
    if not text_encoders:
        raise ConfigError(f"{source}: the model has no text encoder")
    return Pipeline(
        unet=UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), dtype=dtype),
        vae=AutoencoderKL(vae_config, dtype=vae_param_dtype(vae_config, dtype)),
        text_encoders=text_encoders,
        params=params,
        scheduler=SchedulerConfig.from_dict(scheduler_config),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        requires_aesthetics_score=requires_aesthetics_score,
        source=source,
    )


def vae_param_dtype(config: VAEConfig, dtype: Any) -> Any:
    # A VAE that needs float32 (force_upcast) keeps float32 params whatever the pipeline dtype.
    return jnp.float32 if config.force_upcast else dtype


def build_pipeline(
    *,
    configs: dict[str, dict[str, Any]],
    state_dicts: dict[str, dict[str, np.ndarray]],
    scheduler_config: dict[str, Any],
    tokenizer_folders: dict[str, Path | None],
    tokenizer_conventions: dict[str, str] | None = None,
    dtype: Any = jnp.float32,
    source: str = "",
    **flags: Any,
) -> Pipeline:
    """Convert component state dicts (PyTorch naming and layout) into a Pipeline.

    Tokenizers come from ``tokenizer_folders`` when a folder has its own files, else from sdjax's shipped
    vocabulary with the convention given (or guessed from the encoder: OpenCLIP towers use gelu).
    """
    for needed in ("unet", "vae"):
        if needed not in state_dicts:
            raise ConfigError(f"{source}: the model has no {needed}")
    vae_config = VAEConfig.from_dict(configs["vae"])
    params: dict[str, Any] = {
        "unet": convert_unet(state_dicts["unet"], UNetConfig.from_dict(configs["unet"]), dtype=dtype),
        "vae": convert_vae(state_dicts["vae"], vae_config, dtype=vae_param_dtype(vae_config, dtype)),
    }
    tokenizers, projections = {}, {}
    for name in TEXT_ENCODERS:
        if name not in state_dicts:
            continue
        config = CLIPTextConfig.from_dict(configs[name])
        projections[name] = has_projection(state_dicts[name]) or architectures_have_projection(configs[name])
        params[name] = convert_clip_text(state_dicts[name], config, with_projection=projections[name], dtype=dtype)
        convention = (tokenizer_conventions or {}).get(name) or _tokenizer_convention(name, config)
        tokenizers[name] = load_tokenizer(tokenizer_folders.get(name), convention=convention)
    return assemble(configs=configs, params=params, scheduler_config=scheduler_config, tokenizers=tokenizers,
                    projections=projections, dtype=dtype, source=source, **flags)


def load_diffusers_folder(folder: Path, *, dtype: Any = jnp.float32, variant: str | None = None) -> Pipeline:
    index = read_model_index(folder)
    components = pipeline_components(index)
    configs: dict[str, dict[str, Any]] = {}
    state_dicts: dict[str, dict[str, np.ndarray]] = {}
    for name, kind in components.items():
        if kind in ("unet", "vae", "clip"):
            configs[name] = read_json(folder / name / "config.json")
            state_dicts[name] = read_component_weights(folder / name, variant=variant)
    if "scheduler" not in components:
        raise ConfigError(f"{folder}: model_index.json lists no scheduler")
    tokenizer_folders = {
        name: folder / TOKENIZER_FOR[name] if TOKENIZER_FOR[name] in components else None
        for name in TEXT_ENCODERS
    }
    return build_pipeline(
        configs=configs,
        state_dicts=state_dicts,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        tokenizer_folders=tokenizer_folders,
        dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        source=str(folder),
    )


DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "default_model"


def load(
    path: str | Path | None = None,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    prediction_type: str | None = None,
    config: str | Path | None = None,
) -> Pipeline:
    """Load a model: a diffusers folder, a single-file checkpoint (.safetensors / .ckpt), or an sdjax
    checkpoint folder. With no path, the small default model embedded in sdjax.

    ``dtype``: params and compute dtype (float32, bfloat16, float16); sampler arithmetic stays float32 and a
    VAE marked ``force_upcast`` keeps float32. ``variant``: e.g. "fp16" to pick ``*.fp16.safetensors``
    (by default the full-precision files, falling back to fp16 ones). ``prediction_type`` overrides the
    scheduler's (e.g. "v_prediction" for SD 2.x 768-v single files). ``config``: for single files, a
    diffusers-layout folder whose component configs replace the shipped ones of the detected family.
    """
    folder = DEFAULT_MODEL if path is None else Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no model at {folder}")
    if folder.is_dir():
        from sdjax import checkpoint

        if checkpoint.is_sdjax_checkpoint(folder):
            pipe = checkpoint.load_checkpoint(folder, dtype=dtype)
        else:
            pipe = load_diffusers_folder(folder, dtype=dtype, variant=variant)
    else:
        return load_single_file_pipeline(folder, dtype=dtype, prediction_type=prediction_type, configs=config)
    if prediction_type is not None:
        pipe = pipe.replace(scheduler=dataclasses.replace(pipe.scheduler, prediction_type=prediction_type))
    return pipe


def load_single_file_pipeline(path: Path, *, dtype: Any = jnp.float32, prediction_type: str | None = None,
                              configs: Any = None) -> Pipeline:
    """A Pipeline from one .safetensors / .ckpt file in the CompVis / A1111 / ComfyUI layout."""
    from sdjax.convert.single_file import config_dir, load_single_file

    model = load_single_file(path, prediction_type=prediction_type, configs=configs)
    index = read_json(config_dir(model.config_name) / "model_index.json")
    return build_pipeline(
        configs=model.configs,
        state_dicts=model.components,
        scheduler_config=model.scheduler_config,
        tokenizer_folders={},
        tokenizer_conventions=model.tokenizers,
        dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        source=str(path),
    )
