"""A1111 hypernetworks in the UNet's attention: the context fed to ``to_k`` / ``to_v`` goes through a residual MLP
``x + f(x) * strength`` (one for k, one for v) of every hypernetwork that has an entry for the context's width.

``f`` is A1111's ``HypernetworkModule.linear``: for each step of ``layer_structure`` a Linear
``width * ls[i] -> width * ls[i+1]``, then the activation (not after the last Linear unless ``activate_output``),
then an optional LayerNorm; dropout does nothing at inference. Parameter names mirror the file's Sequential
indices (``linear.2.weight`` -> ``linear_2/kernel``). Computed in float32, as A1111 does.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# A1111 names activations by torch's lowercase class names ("swish" is its old name for Hardswish). Only the
# element-wise ones with default arguments; PReLU has a learned slope and is handled apart.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "elu": jax.nn.elu,
    "swish": jax.nn.hard_swish,
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardsigmoid": jax.nn.hard_sigmoid,
    "hardtanh": lambda x: jnp.clip(x, -1.0, 1.0),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    # torch.nn.Softplus(beta=1, threshold=20): linear above the threshold.
    "softplus": lambda x: jnp.where(x > 20.0, x, jax.nn.softplus(x)),
    "softsign": jax.nn.soft_sign,
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "logsigmoid": jax.nn.log_sigmoid,
    "softshrink": lambda x: jnp.where(x > 0.5, x - 0.5, jnp.where(x < -0.5, x + 0.5, 0.0)),
    "hardshrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x, 0.0),
    # RReLU at inference: a fixed slope, the mean of its range (1/8, 1/3).
    "rrelu": lambda x: jnp.where(x >= 0, x, x * ((1 / 8 + 1 / 3) / 2)),
}
SUPPORTED_ACTIVATIONS = (None, "linear", "prelu", *ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class HypernetworkSpec:
    """The static half of one hypernetwork (hashable: part of the UNet module, so of the compile key)."""

    name: str
    widths: tuple[int, ...]
    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation: str | None = None
    layer_norm: bool = False
    activate_output: bool = False
    dropout_structure: tuple[float, ...] | None = None  # only moves the indices of later layers

    def layers(self, width: int) -> list[tuple[int, str, int, int]]:
        """A1111's Sequential for one branch: ``(index, kind, in, out)`` with kind "linear", "activation",
        "norm" or "dropout" (index = position in the file's ``linear`` Sequential)."""
        ls = self.layer_structure
        dropout = self.dropout_structure or (0,) * len(ls)
        out: list[tuple[int, str, int, int]] = []
        for i in range(len(ls) - 1):
            d_in, d_out = int(width * ls[i]), int(width * ls[i + 1])
            out.append((len(out), "linear", d_in, d_out))
            last = i >= len(ls) - 2
            if self.activation not in (None, "linear") and (not last or self.activate_output):
                out.append((len(out), "activation", d_out, d_out))
            if self.layer_norm:
                out.append((len(out), "norm", d_out, d_out))
            if dropout[i + 1] > 0:
                out.append((len(out), "dropout", d_out, d_out))
        return out


class PReLU(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("weight", nn.initializers.constant(0.25), (1,))
        return jnp.where(x >= 0, x, slope * x)


class HypernetworkBranch(nn.Module):
    """``f`` of one branch (k or v) for one width."""

    spec: HypernetworkSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for index, kind, _, d_out in self.spec.layers(x.shape[-1]):
            name = f"linear_{index}"
            if kind == "linear":
                h = nn.Dense(d_out, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(h)
            elif kind == "norm":
                h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name)(h)
            elif kind == "activation":
                h = PReLU(name=name)(h) if self.spec.activation == "prelu" else ACTIVATIONS[self.spec.activation](h)
        return h


class Hypernetwork(nn.Module):
    """(k context, v context) -> both through their branch: ``x + f(x) * strength`` (strength is a param, so a
    new strength is new params, not a new compile)."""

    spec: HypernetworkSpec

    @nn.compact
    def __call__(self, k_in: jax.Array, v_in: jax.Array) -> tuple[jax.Array, jax.Array]:
        strength = self.param("strength", nn.initializers.ones, (), jnp.float32)
        outs = []
        for branch, x in (("k", k_in), ("v", v_in)):
            x32 = x.astype(jnp.float32)
            outs.append((x32 + HypernetworkBranch(self.spec, name=branch)(x32) * strength).astype(x.dtype))
        return outs[0], outs[1]


def apply_hypernetworks(specs: tuple[HypernetworkSpec, ...], context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside an attention module's compact ``__call__``: the contexts for ``to_k`` and ``to_v``. Hypernetworks
    chain in order (A1111's several at once); one without this width leaves the contexts as they are."""
    k_in = v_in = context
    for i, spec in enumerate(specs):
        if context.shape[-1] in spec.widths:
            k_in, v_in = Hypernetwork(spec, name=f"hypernetwork_{i}")(k_in, v_in)
    return k_in, v_in
