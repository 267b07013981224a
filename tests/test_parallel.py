"""Data parallelism: on 4 simulated CPU devices the images are the same as on one, batches that don't divide by
the device count work, and the batch really is sharded over the devices.

XLA's device count is fixed when JAX starts, so the 4-device half runs in a subprocess that saves its images.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdjax import parallel
from tests.conftest import HEIGHT, PROMPTS, STEPS, WIDTH, run_on_simulated_devices

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPTS_3 = [PROMPTS[0], PROMPTS[1], "a third prompt: a green boat at sea"]
SEED = 7
# A stochastic sampler with noise from the seed: every image depends on its per-image key.
OPTIONS = dict(sampler="euler_a", num_steps=STEPS, guidance_scale=7.5, seed=SEED, height=HEIGHT, width=WIDTH)

CHILD = """
import json, sys
import jax
import numpy as np

jax.config.update("jax_disable_most_optimizations", True)
assert jax.device_count() == 4, jax.devices()
import sdjax
from sdjax.generation import core as generate

folder, out, prompts, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
seen = []
original = generate._compiled

def recording(model, plan):
    fn = original(model, plan)

    def call(params, inputs, method):
        result = fn(params, inputs, method)
        seen.append({
            "batch": int(result.shape[0]),
            "devices": len(result.sharding.device_set),
            "replicated": bool(result.sharding.is_fully_replicated),
            "shard_batches": sorted(int(s.data.shape[0]) for s in result.addressable_shards),
            "keys_devices": len(inputs.keys.sharding.device_set),
            "keys_replicated": bool(inputs.keys.sharding.is_fully_replicated),
            "params_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params)),
        })
        return result

    return call

generate._compiled = recording
pipe = sdjax.load(folder)
three = pipe.text_to_image(prompts, **options)
one = pipe.text_to_image(prompts[:1], **options)
np.savez(out, three=three, one=one)
print(json.dumps(seen))
"""


def test_four_devices_match_one(tiny, tmp_path) -> None:
    import json

    sd1 = tiny("sd1")
    out = tmp_path / "four.npz"
    seen = run_on_simulated_devices(CHILD, str(sd1.folder), str(out), json.dumps(PROMPTS_3),
                                   json.dumps(OPTIONS))
    # Both batches (3 and 1) were padded to 4, one image per device, and ran sharded over all 4 devices.
    assert len(seen) == 2
    for call in seen:
        assert call["batch"] == 4 and call["devices"] == 4 and not call["replicated"], call
        assert call["shard_batches"] == [1, 1, 1, 1], call
        assert call["keys_devices"] == 4 and not call["keys_replicated"] and call["params_replicated"], call
    four = np.load(out)
    assert four["three"].shape == (3, HEIGHT, WIDTH, 3) and four["one"].shape == (1, HEIGHT, WIDTH, 3)

    # The same images on one device, whatever the batch and its padding.
    one_device = parallel.data_mesh(jax.devices()[:1])
    single = sd1.pipe.text_to_image(PROMPTS_3, mesh=one_device, **OPTIONS)
    np.testing.assert_allclose(four["three"], single, atol=2e-5, err_msg="4 devices vs 1 device")
    np.testing.assert_allclose(four["one"][0], single[0], atol=2e-5, err_msg="alone (4 devices) vs in a batch of 3")
    assert float(np.abs(single[0] - single[1]).max()) > 4e-3
