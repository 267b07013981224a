"""Classifier guidance on the embedded default model (the seed document's algorithms 1 and 2): with the empty
prompt and no classifier-free guidance, the noise-aware latent classifier's gradient steers 64 samples to the
target, as judged by the shipped pixel classifier. The printed table is what README records."""

from __future__ import annotations

import numpy as np
import pytest

import sdjax
from sdjax import classifier
from sdjax import guidance as g
from sdjax.classifier import HEADS
from sdjax.latent_classifier import log_prob_fn

pytestmark = pytest.mark.usefixtures("optimized")  # many samples of the default model: run time dominates

N, STEPS, SEED = 64, 20, 0
# (algorithm, sampler, scale, head, value). Measured (README): algorithm 2 reaches 100 % for colours and
# backgrounds but only ~75 % for shapes on this noise (the latent classifier and the pixel judge disagree on the
# model's rounded shapes), so its shape case is not asserted; algorithm 1 reaches 94 % for triangles.
CASES = [
    (2, "ddim", 4.0, "color", "red"),
    (2, "ddim", 4.0, "background", "blue"),
    (1, "ddpm", 8.0, "shape", "triangle"),
]


@pytest.fixture(scope="module")
def judged():
    pipe = sdjax.load()
    params, config = classifier.load_classifier()

    unguided: dict[str, np.ndarray] = {}

    def run(sampler: str, method) -> np.ndarray:
        images = pipe.text_to_image([""] * N, guidance=method, sampler=sampler, num_steps=STEPS, seed=SEED)
        return classifier.predict(params, images, config)

    def run_cached(sampler: str, method) -> np.ndarray:
        if isinstance(method, g.Conditional):
            if sampler not in unguided:
                unguided[sampler] = run(sampler, method)
            return unguided[sampler]
        return run(sampler, method)

    return run_cached


@pytest.mark.parametrize(("algorithm", "sampler", "scale", "head", "value"), CASES)
def test_classifier_guidance_reaches_80_percent(judged, algorithm, sampler, scale, head, value) -> None:
    column = list(HEADS).index(head)
    target = HEADS[head].index(value)
    unguided = float(np.mean(judged(sampler, g.Conditional())[:, column] == target))
    method = g.ClassifierGuidance(log_prob_fn(head, value), scale, algorithm=algorithm)
    guided = float(np.mean(judged(sampler, method)[:, column] == target))
    print(f"algorithm {algorithm} ({sampler}, scale {scale:g}) {head}={value}: unguided {unguided:.0%}, "
          f"guided {guided:.0%}")
    assert guided >= 0.80 and guided > unguided + 0.3, (unguided, guided)
