"""Capture: trace a function to a jaxpr and lower it, equation by equation, into the op graph.

Nested calls (jit, closed_call, custom_jvp/vjp, remat) are inlined; every other primitive goes through the
lowering registry. Constants captured by the jaxpr become extra inputs of the custom call.

A function that is one ``shard_map`` is captured as its body (one device's graph, on local shapes): its
collectives lower to communication buffers, and the device's rank becomes an extra input after the
arguments (see :func:`find_shard_map`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.extend.core
import numpy as np

from . import ordering, prng  # noqa: F401  (ordering's rules register on import)
from .errors import UnsupportedDtypeError, UnsupportedPrimitiveError
from .graph import Node, Source
from .layout import DTYPES
from .lowering import RULES, Mesh, RuleContext, const

SUPPORTED_DTYPES = tuple(np.dtype(info.numpy_name) for info in DTYPES.values())

# primitive name -> the param holding the jaxpr to inline
_CALL_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "eval_jaxpr": "jaxpr",
}


@dataclass
class Captured:
    """The op graph of one traced function."""

    jaxpr: object  # ClosedJaxpr, kept for dumps
    inputs: list[Source]  # one per flat argument
    consts: list[np.ndarray]  # values of the extra inputs that follow the arguments
    outputs: list[Node]  # one per flat result
    mesh: Mesh | None = None  # a shard_map body: the mesh it runs on
    rank_input: int = -1  # with a mesh: the input (after the arguments) holding the device's rank


@dataclass(frozen=True)
class ShardMap:
    """A function that is one shard_map: its body and how the body's operands and results are sharded."""

    body: object  # ClosedJaxpr over local (per-device) shapes
    mesh: object  # jax.sharding.Mesh
    in_specs: tuple
    out_specs: tuple

    @property
    def axis_sizes(self) -> tuple[tuple[str, int], ...]:
        return tuple((str(name), int(size)) for name, size in self.mesh.shape.items())


def find_shard_map(closed_jaxpr) -> ShardMap | None:
    """The shard_map ``closed_jaxpr`` consists of (possibly inside a jit), or None when it has none.
    Constants the function closes over reach the shard_map as replicated operands; they become constants
    of the body. Raises UnsupportedPrimitiveError when a shard_map is only part of the function."""
    jaxpr, consts = closed_jaxpr.jaxpr, dict(zip(closed_jaxpr.jaxpr.constvars, closed_jaxpr.consts))
    while len(jaxpr.eqns) == 1 and _passes_through(jaxpr, consts):  # a jit around the shard_map
        param = _CALL_PARAMS.get(jaxpr.eqns[0].primitive.name)
        if param not in jaxpr.eqns[0].params:
            break
        inner = jaxpr.eqns[0].params[param]
        outer_args = [consts[v] if _is_const(v, consts) else v for v in jaxpr.eqns[0].invars]
        jaxpr = getattr(inner, "jaxpr", inner)
        consts = dict(zip(jaxpr.constvars, getattr(inner, "consts", ())))
        consts.update({v: a for v, a in zip(jaxpr.invars, outer_args) if not isinstance(a, jax.extend.core.Var)})
    calls = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    if not calls:
        return None
    if len(jaxpr.eqns) != 1 or not _passes_through(jaxpr, consts):
        raise UnsupportedPrimitiveError("shard_map", source_line(calls[0]), "megakernelize takes a function that "
                                        "is one shard_map, with all of its work inside the body")  # fmt: skip
    params = calls[0].params
    body, in_specs = params["jaxpr"], tuple(params["in_specs"])
    fixed = [i for i, v in enumerate(calls[0].invars) if _is_const(v, consts)]
    for i in fixed:
        if any(axis is not None for axis in in_specs[i]):
            raise UnsupportedPrimitiveError("shard_map", source_line(calls[0]), "a constant the function closes "
                                            "over is sharded; pass it as an argument instead")  # fmt: skip
    body = body.replace(constvars=[body.invars[i] for i in fixed],
                        invars=[v for i, v in enumerate(body.invars) if i not in fixed])  # fmt: skip
    values = [np.asarray(consts[calls[0].invars[i]]) for i in fixed]
    in_specs = tuple(spec for i, spec in enumerate(in_specs) if i not in fixed)
    return ShardMap(jax.extend.core.ClosedJaxpr(body, values), params["mesh"], in_specs, tuple(params["out_specs"]))


def _passes_through(jaxpr, consts) -> bool:
    """The single equation takes the jaxpr's inputs (after constants, if any) and gives its results, in order."""
    (eqn,) = jaxpr.eqns
    args = [v for v in eqn.invars if not _is_const(v, consts)]
    return args == list(jaxpr.invars) and list(eqn.outvars) == list(jaxpr.outvars)


def _is_const(atom, consts) -> bool:
    return isinstance(atom, jax.extend.core.Var) and atom in consts


def source_line(eqn) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # source info is best-effort; jax internals move between versions
        return ""


def check_dtype(dtype, what: str) -> np.dtype:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise UnsupportedDtypeError(f"{what} is a typed PRNG key ({dtype}); pass or return its data "
                                    "(jax.random.key_data, jax.random.wrap_key_data) or a jax.random.PRNGKey")
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise UnsupportedDtypeError(f"{what} has dtype {dtype.name}; jax_mpk supports {names}")
    return dtype


def capture(closed_jaxpr, axis_sizes: tuple[tuple[str, int], ...] | None = None) -> Captured:
    """The op graph of ``closed_jaxpr``; with ``axis_sizes`` (a shard_map body's mesh), with its rank input."""
    jaxpr = closed_jaxpr.jaxpr
    inputs = [
        Source(shape=tuple(v.aval.shape), dtype=check_dtype(v.aval.dtype, f"argument {i}"), index=i)
        for i, v in enumerate(jaxpr.invars)
    ]
    mesh, rank_input = None, -1
    if axis_sizes is not None:
        rank_input = len(inputs)
        mesh = Mesh(tuple(axis_sizes), Source(shape=(), dtype=np.dtype(np.int32), index=rank_input))
        inputs.append(mesh.rank)
    lowerer = _Lowerer(first_const_index=len(inputs), mesh=mesh)
    outputs = lowerer.run(jaxpr, closed_jaxpr.consts, inputs[: len(jaxpr.invars)])
    if lowerer.refusals:
        raise UnsupportedPrimitiveError.of_all(lowerer.refusals)
    for i, node in enumerate(outputs):
        check_dtype(node.dtype, f"result {i}")
    return Captured(jaxpr=closed_jaxpr, inputs=inputs, consts=lowerer.consts, outputs=outputs, mesh=mesh,
                    rank_input=rank_input)  # fmt: skip


class _Lowerer:
    def __init__(self, first_const_index: int, mesh: Mesh | None = None):
        self.first_const_index = first_const_index
        self.mesh = mesh
        self.const_sources: dict[tuple, Source] = {}
        self.consts: list[np.ndarray] = []
        # equations that could not be lowered: lowering goes on past them (their results stand in as zeros),
        # so that one error lists them all; what is computed from a stand-in is not refused again
        self.refusals: list[UnsupportedPrimitiveError] = []
        self.stand_ins: set[int] = set()  # uids of stand-in nodes and of nodes computed from them

    def const_node(self, value) -> Node:
        array = np.asarray(value)
        dtype = check_dtype(array.dtype, "a constant captured by the function")
        if array.shape == ():
            return const(array.item(), dtype)
        # equal arrays become one input (each layer of a model may close over its own copy of a table), since
        # a megakernel takes a bounded number of buffers
        key = (dtype.str, array.shape, array.tobytes())
        if key not in self.const_sources:
            self.consts.append(array)
            index = self.first_const_index + len(self.consts) - 1
            self.const_sources[key] = Source(shape=array.shape, dtype=dtype, index=index)
        return self.const_sources[key]

    def run(self, jaxpr, consts, args: list[Node], caller_source: str = "") -> list[Node]:
        """Lower ``jaxpr``; equations inlined from a library call without user frames of their own are
        attributed to the user's line that made the call (``caller_source``)."""
        env: dict = {}

        def read(atom) -> Node:
            if isinstance(atom, jax.extend.core.Literal):
                return self.const_node(np.asarray(atom.val, dtype=atom.aval.dtype))
            return env[atom]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = self.const_node(value)
        for var, node in zip(jaxpr.invars, args):
            env[var] = node
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            ins = [read(v) for v in eqn.invars]
            source = source_line(eqn) or caller_source
            if name in _CALL_PARAMS and _CALL_PARAMS[name] in eqn.params:
                outs = self.inline(eqn.params[_CALL_PARAMS[name]], ins, source)
            elif name in prng.PASS_THROUGH:  # a key is carried as its data
                outs = ins
            elif (expanded := prng.expansion(eqn, source)) is not None:
                outs = self.inline(expanded, ins, source)
            elif any(prng.is_key(v.aval) for v in (*eqn.invars, *eqn.outvars)):
                raise UnsupportedPrimitiveError(name, source, "on typed PRNG keys: jax_mpk draws with one key at a "
                                                "time; index or reshape the key data (jax.random.key_data) "
                                                "instead")  # fmt: skip
            else:
                from_stand_in = any(n.uid in self.stand_ins for n in ins)
                try:
                    outs = self.apply_rule(eqn, ins, source)
                except UnsupportedPrimitiveError as refusal:
                    if not from_stand_in or name not in RULES:  # a missing rule does not depend on the inputs
                        self.refusals.append(refusal)
                    outs, from_stand_in = [self.stand_in(v.aval) for v in eqn.outvars], True
                if from_stand_in:
                    self.stand_ins.update(n.uid for n in outs)
            for var, node in zip(eqn.outvars, outs):
                env[var] = node
        return [read(v) for v in jaxpr.outvars]

    def stand_in(self, aval) -> Node:
        """Zeros in place of a result that could not be lowered (uint32 for a dtype jax_mpk has not)."""
        dtype = np.dtype(aval.dtype) if aval.dtype in SUPPORTED_DTYPES else np.dtype(np.uint32)
        return const(0, dtype, tuple(aval.shape))

    def inline(self, sub, ins: list[Node], source: str) -> list[Node]:
        if hasattr(sub, "jaxpr"):  # ClosedJaxpr
            return self.run(sub.jaxpr, sub.consts, ins, source)
        return self.run(sub, [], ins, source)

    def apply_rule(self, eqn, ins: list[Node], source: str) -> list[Node]:
        name = eqn.primitive.name
        lower = RULES.get(name)
        if name == "shard_map":
            raise UnsupportedPrimitiveError(name, source, "megakernelize takes a function that is one shard_map, "
                                            "with all of its work inside the body (no nesting)")  # fmt: skip
        if lower is None:
            raise UnsupportedPrimitiveError(name, source, "no lowering rule (see jax_mpk.supported_primitives())")
        for i, v in enumerate(eqn.outvars):
            check_dtype(v.aval.dtype, f"result {i} of '{name}' at {source}")
        ctx = RuleContext(
            primitive=name,
            in_avals=tuple(v.aval for v in eqn.invars),
            out_avals=tuple(v.aval for v in eqn.outvars),
            source=source,
            mesh=self.mesh,
        )
        try:
            result = lower(ctx, *ins, **eqn.params)
        except UnsupportedPrimitiveError:
            raise
        except Exception as exc:
            raise UnsupportedPrimitiveError(name, source, f"lowering failed: {exc!r}") from exc
        outs = result if isinstance(result, list) else [result]
        for node, var in zip(outs, eqn.outvars):
            if tuple(node.shape) != tuple(var.aval.shape) or np.dtype(node.dtype) != np.dtype(var.aval.dtype):
                raise UnsupportedPrimitiveError(
                    name, source, f"rule produced {node.shape}/{node.dtype}, jaxpr says {var.aval.str_short()}"
                )
            if not node.source:
                node.source = source
        return outs
