"""The README example: one decorator turns a JAX function into one megakernel call."""

import jax
import jax.numpy as jnp

import jax_mpk


@jax_mpk.megakernelize
def mlp_block(x, w_gate, w_up, w_down):
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)  # RMSNorm
    return x + (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down  # SwiGLU + residual


if __name__ == "__main__":
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (2, 256))
    w_gate, w_up = (jax.random.normal(k, (256, 512)) * 0.05 for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (512, 256)) * 0.05
    out = mlp_block(x, w_gate, w_up, w_down)
    reference = jax.jit(mlp_block.__wrapped__)(x, w_gate, w_up, w_down)
    print("max |megakernel - jax.jit| =", float(jnp.max(jnp.abs(out - reference))))
    (plan,) = mlp_block.plans.values()
    print(plan)
    print(plan.graph)
