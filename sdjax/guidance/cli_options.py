"""The command line's guidance options: parser group, the method they build, and their A1111 metadata."""

from __future__ import annotations

import argparse
from typing import Any

from sdjax.guidance.methods import (
    APG,
    CFG,
    DYNTHRESH_MODES,
    DYNTHRESH_STARTPOINTS,
    DYNTHRESH_VARIABILITIES,
    CFGPlusPlus,
    ClampLinear,
    ClassifierGuidance,
    Conditional,
    Cosine,
    DynamicThresholding,
    Interval,
    Linear,
    Method,
    PerpNeg,
)

SCHEDULES = ("constant", "linear", "cosine", "clamp-linear")
RESCALE_SPACES = ("output", "eps", "x0", "v")
# Scales per algorithm and head that work for the embedded default model with its latent classifier (measured in
# tests/test_classifier_guidance.py): shapes need more than colours.
DEFAULT_CLASSIFIER_SCALE = {1: {"shape": 24.0, "color": 8.0, "background": 8.0},
                            2: {"shape": 16.0, "color": 4.0, "background": 4.0}}
# sd-dynamic-thresholding's modes that use its "Scheduler value"
DYNTHRESH_MODES_WITH_VALUE = ("Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")


class GuidanceError(ValueError):
    """A bad guidance option (the message names it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("guidance research")
    g.add_argument("--guidance-schedule", choices=SCHEDULES, default="constant",
                   help="CFG scale over the steps (Wang et al. 2024): linear / cosine rise from 0 to 2x --guidance "
                        "(mean --guidance); clamp-linear never below --guidance-clamp")
    g.add_argument("--guidance-clamp", type=float, default=1.0, help="lower bound of the clamp-linear schedule")
    g.add_argument("--guidance-interval", metavar="SIGMA_MIN:SIGMA_MAX",
                   help="guide only where sigma is in (min, max] (Kynkäänniemi et al. 2024); outside, one UNet "
                        "pass (default: everywhere)")
    g.add_argument("--rescale-space", choices=RESCALE_SPACES, default="output",
                   help="space --guidance-rescale works in: the model's output (diffusers), eps, x0 or v (ComfyUI)")
    g.add_argument("--cfg-pp", type=float, metavar="LAMBDA",
                   help="CFG++ (Chung et al. 2025) with this lambda in [0, 1] instead of CFG; samplers ddim, euler, "
                        "euler_a, dpmpp_2m (default: off)")
    g.add_argument("--apg", action="store_true",
                   help="adaptive projected guidance (Sadat et al. 2025) at scale --guidance instead of CFG")
    g.add_argument("--apg-eta", type=float, default=0.0, help="APG: weight of the parallel component")
    g.add_argument("--apg-momentum", type=float, default=0.0, help="APG: momentum of the running average")
    g.add_argument("--apg-norm-threshold", type=float, default=0.0, help="APG: norm cap of the update (0: none)")
    g.add_argument("--perp-neg", type=float, metavar="NEG_SCALE",
                   help="Perp-Neg (Armandpour et al. 2023): the negative prompt's part along the prompt is removed "
                        "(three UNet passes) (default: off)")
    g.add_argument("--dynamic-thresholding", type=float, metavar="MIMIC_SCALE",
                   help="dynamic thresholding, \"CFG scale fix\" (mcmonkey's sd-dynamic-thresholding): CFG at "
                        "--guidance, its x0 re-spread per channel to look like CFG at MIMIC_SCALE (default: off)")
    g.add_argument("--dt-percentile", type=float, default=100.0, metavar="PERCENT",
                   help="dynamic thresholding: top percentile of latents to clamp (A1111's slider, 90-100)")
    g.add_argument("--dt-mimic-mode", type=_dt_mode, default="Constant", metavar="MODE",
                   help=f"dynamic thresholding: mimic scale schedule, one of {', '.join(DYNTHRESH_MODES)}")
    g.add_argument("--dt-mimic-min", type=float, default=0.0,
                   help="dynamic thresholding: mimic schedule minimum (default: 0)")
    g.add_argument("--dt-cfg-mode", type=_dt_mode, default="Constant", metavar="MODE",
                   help="dynamic thresholding: CFG scale schedule (modes as --dt-mimic-mode)")
    g.add_argument("--dt-cfg-min", type=float, default=0.0,
                   help="dynamic thresholding: CFG schedule minimum (default: 0)")
    g.add_argument("--dt-sched-val", type=float, default=4.0,
                   help="dynamic thresholding: the power (Power Up/Down) or repeats (Repeating, Sawtooth)")
    g.add_argument("--dt-phi", type=float, default=1.0,
                   help="dynamic thresholding: interpolate phi (1: all thresholded, 0: plain CFG)")
    g.add_argument("--dt-no-separate-channels", action="store_true",
                   help="dynamic thresholding: measure the spread over all latent channels, not per channel")
    g.add_argument("--dt-startpoint", choices=DYNTHRESH_STARTPOINTS, default="MEAN",
                   help="dynamic thresholding: scale from the per-channel mean or from zero")
    g.add_argument("--dt-variability", choices=DYNTHRESH_VARIABILITIES, default="AD",
                   help="dynamic thresholding: spread measured as absolute deviation or standard deviation")
    g.add_argument("--classifier-guidance", action="append", default=[], metavar="HEAD=VALUE",
                   help="guide with the embedded default model's noise-aware latent classifier, e.g. shape=triangle, "
                        "color=red, background=blue (repeatable; algorithm 1 with --sampler ddpm, else 2)")
    g.add_argument("--classifier-scale", type=float,
                   help="scale of --classifier-guidance (default: per head, see README: with --sampler ddpm "
                        "(algorithm 1) 24 for shape, 8 for color and background; else 16 and 4)")

    for action in g._group_actions:  # every option's help names its default
        if action.help and "default" not in action.help:
            off = action.default in (None, False, [])
            action.help += " (default: off)" if off else f" (default: {action.default})"


def _dt_mode(text: str) -> str:
    for mode in DYNTHRESH_MODES:
        if text.strip().lower() == mode.lower():
            return mode
    raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(DYNTHRESH_MODES)}")


def _interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) if v else None for v in text.split(":"))
    except ValueError:
        raise GuidanceError(f"--guidance-interval {text!r}: give SIGMA_MIN:SIGMA_MAX, e.g. 0.3:5") from None
    low = 0.0 if low is None else low
    high = float("inf") if high is None else high
    if not 0.0 <= low < high:
        raise GuidanceError(f"--guidance-interval {text!r}: need 0 <= SIGMA_MIN < SIGMA_MAX")
    return low, high


def build(args: argparse.Namespace) -> Method | None:
    """The method the options ask for, or None when only --guidance / --guidance-rescale are used (plain CFG)."""
    chosen = [name for name, on in (("--cfg-pp", args.cfg_pp is not None), ("--apg", args.apg),
                                    ("--perp-neg", args.perp_neg is not None),
                                    ("--dynamic-thresholding", args.dynamic_thresholding is not None)) if on]
    if len(chosen) > 1:
        raise GuidanceError(f"{' and '.join(chosen)}: choose one guidance method")
    plain = (not chosen and args.guidance_schedule == "constant" and args.guidance_interval is None
             and args.rescale_space == "output" and not args.classifier_guidance)
    if plain:
        return None
    scale: Any = args.guidance
    if args.guidance_schedule == "linear":
        scale = Linear(args.guidance)
    elif args.guidance_schedule == "cosine":
        scale = Cosine(args.guidance)
    elif args.guidance_schedule == "clamp-linear":
        scale = ClampLinear(args.guidance, clamp=args.guidance_clamp)
    if args.cfg_pp is not None:
        if not 0.0 <= args.cfg_pp <= 1.0:
            raise GuidanceError(f"--cfg-pp must be in [0, 1], got {args.cfg_pp:g}")
        method: Method = CFGPlusPlus(args.cfg_pp)
    elif args.apg:
        method = APG(scale, eta=args.apg_eta, momentum=args.apg_momentum, norm_threshold=args.apg_norm_threshold)
    elif args.perp_neg is not None:
        method = PerpNeg(scale, neg_scale=args.perp_neg)
    elif args.dynamic_thresholding is not None:
        method = _dynamic_thresholding(args, scale)
    elif args.guidance_schedule == "constant" and args.guidance <= 1.0:
        method = Conditional()
    else:
        method = CFG(scale, rescale=args.guidance_rescale, rescale_space=args.rescale_space)
    if args.guidance_interval is not None:
        low, high = _interval(args.guidance_interval)
        method = Interval(method, sigma_min=low, sigma_max=high)
    for target in args.classifier_guidance:
        method = ClassifierGuidance(_classifier(target), _classifier_scale(args, target), inner=method)
    return method


def _dynamic_thresholding(args: argparse.Namespace, scale: Any) -> DynamicThresholding:
    if args.dynamic_thresholding < 0:
        raise GuidanceError(f"--dynamic-thresholding must be >= 0, got {args.dynamic_thresholding:g}")
    if not 0.0 <= args.dt_percentile <= 100.0:
        raise GuidanceError(f"--dt-percentile must be in [0, 100], got {args.dt_percentile:g}")
    if not 0.0 <= args.dt_phi <= 1.0:
        raise GuidanceError(f"--dt-phi must be in [0, 1], got {args.dt_phi:g}")
    return DynamicThresholding(
        scale, mimic_scale=args.dynamic_thresholding, threshold_percentile=args.dt_percentile / 100.0,
        mimic_scale_min=args.dt_mimic_min, cfg_scale_min=args.dt_cfg_min, sched_val=args.dt_sched_val,
        interpolate_phi=args.dt_phi, mimic_mode=args.dt_mimic_mode, cfg_mode=args.dt_cfg_mode,
        separate_feature_channels=not args.dt_no_separate_channels, scaling_startpoint=args.dt_startpoint,
        variability_measure=args.dt_variability)


def _dynamic_thresholding_metadata(args: argparse.Namespace) -> dict[str, Any]:
    """The fields sd-dynamic-thresholding writes (so A1111 reads the settings back)."""
    if args.dynamic_thresholding is None:
        return {}
    fields: dict[str, Any] = {
        "Dynamic thresholding enabled": "True", "Mimic scale": f"{args.dynamic_thresholding:g}",
        "Separate Feature Channels": str(not args.dt_no_separate_channels),
        "Scaling Startpoint": args.dt_startpoint, "Variability Measure": args.dt_variability,
        "Interpolate Phi": f"{args.dt_phi:g}", "Threshold percentile": f"{args.dt_percentile:g}",
    }
    if args.dt_mimic_mode != "Constant":
        fields.update({"Mimic mode": args.dt_mimic_mode, "Mimic scale minimum": f"{args.dt_mimic_min:g}"})
    if args.dt_cfg_mode != "Constant":
        fields.update({"CFG mode": args.dt_cfg_mode, "CFG scale minimum": f"{args.dt_cfg_min:g}"})
    if {args.dt_mimic_mode, args.dt_cfg_mode} & set(DYNTHRESH_MODES_WITH_VALUE):
        fields["Scheduler value"] = f"{args.dt_sched_val:g}"
    return fields


def _classifier(target: str) -> Any:
    from sdjax import latent_classifier

    try:
        head, value = latent_classifier.parse_target(target)
    except ValueError as e:
        raise GuidanceError(f"--classifier-guidance: {e}") from None
    return latent_classifier.log_prob_fn(head, value)


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    """A1111-style ``parameters`` fields for the options that change the image (None: not used)."""
    interval = args.guidance_interval
    return {
        "CFG schedule": None if args.guidance_schedule == "constant" else (
            f"clamp-linear {args.guidance_clamp:g}" if args.guidance_schedule == "clamp-linear"
            else args.guidance_schedule),
        "Guidance interval": interval,
        "CFG rescale space": None if args.rescale_space == "output" else args.rescale_space,
        "CFG++": None if args.cfg_pp is None else f"{args.cfg_pp:g}",
        "APG": (f"eta {args.apg_eta:g}, momentum {args.apg_momentum:g}, norm threshold {args.apg_norm_threshold:g}"
                if args.apg else None),
        "Perp-Neg": None if args.perp_neg is None else f"{args.perp_neg:g}",
        **_dynamic_thresholding_metadata(args),
        "Classifier guidance": ", ".join(f"{t} (scale {_classifier_scale(args, t):g})"
                                         for t in args.classifier_guidance) or None,
    }


def _classifier_scale(args: argparse.Namespace, target: str) -> float:
    if args.classifier_scale is not None:
        return args.classifier_scale
    from sdjax import latent_classifier

    head, _ = latent_classifier.parse_target(target)
    return DEFAULT_CLASSIFIER_SCALE[1 if args.sampler == "ddpm" else 2][head]
