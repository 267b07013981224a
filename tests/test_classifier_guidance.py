"""Classifier guidance on the embedded default model (the seed document's algorithms 1 and 2): with the empty
prompt and no classifier-free guidance, the noise-aware latent classifier's gradient steers 64 samples per
target (each shape, a shape colour, a background colour) to the target, as judged by the shipped pixel
classifier, with both algorithms at the CLI's default scales. The printed table is what README records.

Cost: per algorithm one unguided run of 64 images and one guided run of 5 x 64 images, every target in the
same batch (``batch_log_prob_fn``: image i towards its own target, at its head's scale), so one compile each."""

from __future__ import annotations

import numpy as np
import pytest

import sdjax
from sdjax import classifier
from sdjax import guidance as g
from sdjax.classifier import HEADS
from sdjax.guidance.cli_options import DEFAULT_CLASSIFIER_SCALE
from sdjax.latent_classifier import batch_log_prob_fn

pytestmark = pytest.mark.usefixtures("optimized")  # many samples of the default model: run time dominates

N, STEPS, SEED = 64, 20, 0
TARGETS = (("shape", "circle"), ("shape", "square"), ("shape", "triangle"), ("color", "red"),
           ("background", "blue"))
SAMPLERS = {1: "ddpm", 2: "ddim"}


@pytest.fixture(scope="module")
def table() -> dict[tuple[int, str, str], tuple[float, float]]:
    """(algorithm, head, value) -> (unguided share, guided share). Target j's guided samples are seeds
    64j .. 64j + 63; the unguided share is over seeds 0 .. 63."""
    pipe = sdjax.load()
    params, config = classifier.load_classifier()
    rows = {}
    for algorithm, sampler in SAMPLERS.items():
        unguided = classifier.predict(params, pipe.text_to_image(
            [""] * N, guidance=g.Conditional(), sampler=sampler, num_steps=STEPS, seed=SEED), config)
        targets = [target for target in TARGETS for _ in range(N)]
        scales = [DEFAULT_CLASSIFIER_SCALE[algorithm][head] for head, _ in targets]
        method = g.ClassifierGuidance(batch_log_prob_fn(targets, scales), 1.0, algorithm=algorithm)
        guided = classifier.predict(params, pipe.text_to_image(
            [""] * len(targets), guidance=method, sampler=sampler, num_steps=STEPS, seed=SEED), config)
        for j, (head, value) in enumerate(TARGETS):
            column, index = list(HEADS).index(head), HEADS[head].index(value)
            share = float(np.mean(guided[j * N:(j + 1) * N, column] == index))
            rows[algorithm, head, value] = float(np.mean(unguided[:, column] == index)), share
            print(f"algorithm {algorithm} ({sampler}, scale {DEFAULT_CLASSIFIER_SCALE[algorithm][head]:g}) "
                  f"{head}={value}: unguided {rows[algorithm, head, value][0]:.0%}, guided {share:.0%}")
    return rows


@pytest.mark.parametrize("algorithm", sorted(SAMPLERS))
@pytest.mark.parametrize(("head", "value"), TARGETS)
def test_classifier_guidance_reaches_80_percent(table, algorithm, head, value) -> None:
    unguided, guided = table[algorithm, head, value]
    assert guided >= 0.80 and guided > unguided + 0.3, (unguided, guided)
