"""The Pipeline: configs, Flax modules, one params pytree and the tokenizers of a Stable Diffusion model.

``sdjax.load(path)`` (the package ``sdjax.loaders``) builds one from any checkpoint format; this module imports
no loader, so everything can import it. The generation methods (text-to-image, image-to-image, inpainting) all
build one ``sdjax.generation.Request``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.samplers.schedules import SchedulerConfig

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
        from sdjax.convert.lora import merged_lora_params

        return self.replace(params=merged_lora_params(self.params, [(source, weight)], unet_config=self.unet.config))

    def with_embeddings(self, source: Any, *, token: str | None = None) -> Pipeline:
        """A new pipeline with a textual-inversion embedding added as new token(s) (A1111 .pt/.safetensors,
        diffusers learned_embeds, SDXL clip_l/clip_g pairs); ``token`` defaults to the file's name."""
        from sdjax.convert.embeddings import added_tokens

        return self.with_added_tokens(added_tokens(self, source, token=token))

    def with_added_tokens(self, added: Any) -> Pipeline:
        """A new pipeline with new tokenizers and token-embedding tables (``sdjax.convert.embeddings.AddedTokens``:
        encoder name -> tokenizer, and -> embedding table), the text encoders' vocab sizes following the tables."""
        text_encoders, params = dict(self.text_encoders), dict(self.params)
        for name, tokenizer in added.tokenizers.items():
            table = added.embedding_tables[name]
            encoder = text_encoders[name]
            config = dataclasses.replace(encoder.config, vocab_size=int(table.shape[0]))
            text_encoders[name] = dataclasses.replace(encoder, module=encoder.module.clone(config=config),
                                                      tokenizer=tokenizer)
            component = dict(params[name])
            embeddings = dict(component["embeddings"])
            embeddings["token_embedding"] = {**embeddings["token_embedding"], "embedding": table}
            params[name] = {**component, "embeddings": embeddings}
        return self.replace(text_encoders=text_encoders, params=params)

    def with_vae(self, vae: AutoencoderKL, params: Any) -> Pipeline:
        """A new pipeline with another VAE (``sdjax.load(model, vae=PATH)`` reads one from a file or folder)."""
        return self.replace(vae=vae, params={**self.params, "vae": params})

    def with_unet(self, unet: UNet2DConditionModel, params: Any) -> Pipeline:
        """A new pipeline with another UNet (``sdjax.load(model, unet=PATH)`` reads one from a file or folder)."""
        return self.replace(unet=unet, params={**self.params, "unet": params})

    def with_scheduler(self, **changes: Any) -> Pipeline:
        """A new pipeline whose scheduler config has ``changes`` (e.g. ``timestep_spacing="trailing"``)."""
        return self.replace(scheduler=dataclasses.replace(self.scheduler, **changes))

    def with_preset(self, name: str) -> Pipeline:
        """A new pipeline with the scheduler settings of a few-step preset (see ``sdjax.presets.PRESETS``); the
        preset's steps / guidance / sampler come from ``sdjax.presets.generation_defaults(name)``."""
        from sdjax.presets import get_preset

        return self.with_scheduler(**get_preset(name).scheduler_overrides)

    # --- generation (the public API): all three tasks build one Request and run it --------------------------

    def text_to_image(
        self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
        num_steps: int = 30, guidance: Any = None, guidance_scale: Any = None, sampler: str = "euler",
        schedule: str | None = None, seed: int = 0, latents: Any = None, height: int | None = None,
        width: int | None = None, clip_skip: int | None = None, guidance_rescale: float = 0.0,
        eta: float | None = None, output: str = "np", hires_scale: float | None = None,
        hires_strength: float | None = None, hires_steps: int | None = None, hires_upscaler: str | None = None,
        **options: Any,
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
        ``lora_dir`` / ``hypernetwork_dir`` (any task): folders for A1111's ``<lora:name:0.8>`` /
        ``<hypernet:name:1.0>`` tags in the prompt (:mod:`sdjax.extra_networks`), applied and removed from it.
        ``eta``: None uses the sampler's own (DDIM 0; ancestral and SDE samplers 1, as diffusers).
        ``prompt_embeds`` / ``negative_prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``,
        ``negative_pooled_prompt_embeds``) instead of text, in diffusers' layouts (e.g. from
        :meth:`encode_prompt`); any task takes them.
        ``hires_scale``: A1111's hires fix (:mod:`sdjax.hires`): generate at ``height`` x ``width``, upscale by
        ``hires_scale`` with ``hires_upscaler`` (A1111's names: "Latent" (default, bilinear), "Latent (bicubic)",
        "Latent (nearest)", ..., or "Lanczos" in pixels), then image-to-image at ``hires_strength`` (default
        0.7) for ``hires_steps`` steps (default: ``num_steps``), all in this call.
        """
        arguments = _arguments(locals())  # first: the imports below would join the locals
        from sdjax.hires import OPTIONS, HiresOptions, hires_fix

        hires = {k: arguments.pop(k) for k in OPTIONS}
        if any(v is not None for v in hires.values()):
            options = HiresOptions.build(*hires.values())
            networks, arguments = self._prompt_networks(arguments)
            return hires_fix(self, arguments, options, networks)
        return self._generate("text", arguments)

    def image_to_image(
        self, prompt: str | list[str], image: Any, *, strength: float = 0.8,
        negative_prompt: str | list[str] | None = None, num_steps: int = 30, guidance: Any = None,
        guidance_scale: Any = None, sampler: str = "euler", schedule: str | None = None, seed: int = 0,
        latents: Any = None, clip_skip: int | None = None, guidance_rescale: float = 0.0, eta: float | None = None,
        output: str = "np", **options: Any,
    ) -> Any:
        """Re-draw ``image`` (PIL image(s) or an array in [0, 1]) guided by ``prompt``; ``strength`` picks how
        much of the schedule runs (1.0 = all of it). ``image`` may also be latents in diffusers' layout (scaled,
        as ``output="latent"`` gives): noised to the start step as encoded pixels are, or, with
        ``denoising_start``, taken as already noised (an SDXL base's hand-off to the refiner); SDXL's refiner also takes
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

    def _prompt_networks(self, arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A1111's ``<lora:...>`` / ``<hypernet:...>`` tags (:mod:`sdjax.extra_networks`), found but not yet read,
        and the arguments with the tags out of the prompts and ``lora_dir`` / ``hypernetwork_dir`` taken out of
        the options. The caller merges them once the request has passed its checks."""
        extra = dict(arguments["options"])
        folders = {k: extra.pop(k, None) for k in ("lora_dir", "hypernetwork_dir")}
        arguments = {**arguments, "options": extra}
        prompt = arguments.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list | tuple) and prompt
                                            and all(isinstance(p, str) for p in prompt))):
            return (), arguments  # embeddings, or a prompt Request.build will refuse
        from sdjax.extra_networks import parse

        prompts, networks = parse(prompt, **folders)
        return networks, {**arguments, "prompt": prompts}

    def _generate(self, task: str, options: dict[str, Any]) -> Any:
        from sdjax.extra_networks import with_networks
        from sdjax.generation import Request, run
        from sdjax.generation.host import with_request_ip_adapters

        networks, options = self._prompt_networks(options)
        extra = options.pop("options")
        execution = {k: extra.pop(k) for k in ("progress", "mesh", "image_index_offset") if k in extra}
        request = Request.build(task, options.pop("prompt"), **options, **extra)
        pipe = with_networks(self, networks)  # weights read only for a request that passed its checks
        return run(with_request_ip_adapters(pipe, request), request, **execution)

    # --- any size -------------------------------------------------------------------------------------------

    @property
    def tiling(self) -> bool:
        """Whether the UNet and VAE pad circularly (see :meth:`with_tiling`)."""
        return self.unet.padding_mode == "circular"

    def with_tiling(self, enabled: bool = True) -> Pipeline:
        """A new pipeline whose UNet and VAE convolutions pad circularly (A1111's "Tiling", which sets
        ``padding_mode="circular"`` on every Conv2d): its images tile seamlessly, for textures. The params are
        shared; ``with_tiling(False)`` gives back zero padding. Compiles once per setting."""
        mode = "circular" if enabled else "zeros"
        return self.replace(unet=self.unet.clone(padding_mode=mode), vae=self.vae.clone(padding_mode=mode))

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

