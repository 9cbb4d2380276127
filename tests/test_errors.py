"""Every bad input gives a clear Python exception naming the cause."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mpk


def test_unsupported_primitive_names_primitive_and_source_line():
    def f(x):
        return jax.lax.lgamma(x)

    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match=r"'lgamma'.*test_errors.py"):
        jax_mpk.megakernelize(f)(jnp.ones((4,)))


def test_every_unsupported_primitive_is_listed_in_one_error(rng):
    """Users fix them in one go: each refused primitive with its own source line; a primitive whose input
    could not be lowered is still refused for itself, and nothing computed from a refused value is listed."""

    def f(x):
        factor = jnp.linalg.cholesky(x @ x.T + 8.0 * jnp.eye(3))  # LINE_CHOLESKY
        doubled = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0), (0, factor))[1]  # LINE_WHILE
        return jnp.tanh(doubled) + x[:, :3]

    lines = {tag: i + 1 for i, text in enumerate(open(__file__).read().splitlines()) for tag in
             ("LINE_CHOLESKY", "LINE_WHILE") if text.endswith(f"# {tag}")}  # fmt: skip
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError) as info:
        jax_mpk.megakernelize(f)(x)
    message = str(info.value)
    assert message.startswith("jax_mpk cannot lower 2 equations"), message
    assert [r.primitive for r in info.value.refusals] == ["cholesky", "while"], message
    assert f"'cholesky' at {__file__}:{lines['LINE_CHOLESKY']}" in message, message
    assert f"'while' at {__file__}:{lines['LINE_WHILE']}" in message, message


def test_unsupported_gather_form():
    def f(x, i):
        return jnp.take_along_axis(x, i, axis=1)

    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="gather"):
        jax_mpk.megakernelize(f)(jnp.ones((3, 4)), jnp.zeros((3, 2), jnp.int32))


def test_unsupported_dtype():
    with jax.enable_x64(True):
        with pytest.raises(jax_mpk.UnsupportedDtypeError, match="float64"):
            jax_mpk.megakernelize(lambda x: x * 2)(jnp.ones((3,), jnp.float64))


def test_signature_mismatch_names_the_argument():
    mk = jax_mpk.compile(lambda x, y: x + y["b"], jnp.ones((2, 3)), {"b": jnp.ones((2, 3))})
    with pytest.raises(jax_mpk.SignatureMismatchError, match=r"\['b'\].*float32\[2, 3\].*float32\[3, 3\]"):
        mk(jnp.ones((2, 3)), {"b": jnp.ones((3, 3))})
    with pytest.raises(jax_mpk.SignatureMismatchError, match="int32"):
        mk(jnp.ones((2, 3), jnp.int32), {"b": jnp.ones((2, 3))})
    with pytest.raises(jax_mpk.SignatureMismatchError, match="structure"):
        mk(jnp.ones((2, 3)), [jnp.ones((2, 3))])


def test_graph_too_large(monkeypatch):
    monkeypatch.setenv("JAX_MPK_MAX_TASKS", "2")
    with pytest.raises(jax_mpk.GraphTooLargeError, match="JAX_MPK_MAX_TASKS"):
        jax_mpk.megakernelize(lambda x: jnp.exp(x) @ x.T + 1)(jnp.ones((8, 8)))


def test_workspace_too_large(monkeypatch):
    monkeypatch.setenv("JAX_MPK_MAX_WORKSPACE_BYTES", "64")
    with pytest.raises(jax_mpk.GraphTooLargeError, match="workspace"):
        jax_mpk.megakernelize(lambda x: jnp.exp(x) @ x.T + 1)(jnp.ones((8, 8)))


def test_vmap_is_refused_clearly():
    f = jax_mpk.megakernelize(lambda x: x * 2)
    with pytest.raises(Exception, match="vmap|batch"):
        jax.vmap(f)(jnp.ones((2, 3)))


def test_errors_share_a_base_class():
    for name in ["UnsupportedPrimitiveError", "UnsupportedDtypeError", "SignatureMismatchError",
                 "GraphTooLargeError", "DependencyTimeoutError", "InvalidTaskGraphError", "InvalidArgumentError"]:  # fmt: skip
        assert issubclass(getattr(jax_mpk, name), jax_mpk.MegakernelError)


def test_supported_primitives_listed():
    names = jax_mpk.supported_primitives()
    for p in ["dot_general", "dynamic_update_slice", "gather", "reduce_sum", "argmax", "concatenate"]:
        assert p in names
    assert np.all(np.array(names) == np.sort(names))
