"""The fuzzer's generators: one per primitive name (or the generic one for a registered elementwise rule that
``jax.lax`` exposes under the same name), each writing one line of a random :class:`~jax_mpk.testing.programs.Program`
over the values drawn so far; :func:`generate` draws a whole program from a seed."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax import lax

import jax_mpk

from .programs import DIMS, DTYPES, FLOATS, INPUT_DTYPES, MAX_ELEMENTS, SOURCE_NAMESPACE, Knobs, Line, Program, Value

# Registered rules that are not generated outside a shard_map body (collectives) or that tracing never emits.
NOT_GENERATED = {
    "psum": "collective: needs a shard_map body", "psum_invariant": "collective: needs a shard_map body",
    "pvary": "collective: needs a shard_map body", "all_gather": "collective: needs a shard_map body",
    "reduce_scatter": "collective: needs a shard_map body", "axis_index": "collective: needs a shard_map body",
    "add_any": "only autodiff emits it", "expand_dims": "not a jaxpr primitive (lax.expand_dims is a reshape)",
    "copy_p": "the same rule as copy",
    **dict.fromkeys(("reshard", "sharding_constraint", "mesh_cast", "layout_constraint", "shard_alike"),
                    "a sharding annotation, an identity on one device (tests/test_collectives.py)"),
    **dict.fromkeys(("threefry2x32", "iota_2x32_shape"),
                    "emitted by jax.random's key expansion, on uint32 key data (tests/test_sampling.py)"),
}  # fmt: skip


class NoOperand(Exception):
    """The program has no value a generator can take (it is tried again with another primitive)."""


class Builder:
    """The growing program a generator adds one line to: pick operands, add arguments."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.args: list[Value] = []
        self.lines: list[Line] = []
        self.pool: list[Value] = []  # every value so far, arguments and line results

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.args) + sum(len(ln.outs) for ln in self.lines)}"

    def arg(self, shape, dtype: str, int_range: tuple[int, int] | None = None) -> Value:
        value = Value(self.name("a"), tuple(int(d) for d in shape), dtype, int_range)
        self.args.append(value)
        self.pool.append(value)
        return value

    def find(self, accept: Callable[[Value], bool] = lambda v: True) -> Value | None:
        """A value that ``accept``s, preferring recent ones (so that chains grow deep); None if there is none."""
        candidates = [v for v in self.pool if accept(v)]
        if not candidates:
            return None
        if self.rng.random() < 0.5:
            return candidates[-1 - int(self.rng.integers(min(3, len(candidates))))]
        return candidates[int(self.rng.integers(len(candidates)))]

    def pick(self, accept: Callable[[Value], bool] = lambda v: True) -> Value:
        """An operand that ``accept``s; without one, the generator gives up (:class:`NoOperand`)."""
        found = self.find(accept)
        if found is None:
            raise NoOperand
        return found

    def like(self, shape, dtype: str) -> Value:
        """A value of this shape and dtype: an existing one (sharing makes fusion interesting) or a new input."""
        shape = tuple(shape)
        found = self.find(lambda v: v.shape == shape and v.dtype == dtype and v.int_range is None)
        if found is not None and self.rng.random() < 0.6:
            return found
        return self.arg(shape, dtype)

    def shape(self, max_rank: int = 3) -> tuple[int, ...]:
        rank = int(self.rng.integers(0, max_rank + 1))
        return tuple(int(self.rng.choice(DIMS)) for _ in range(rank))

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]


Generator = Callable[[Builder], "str | None"]
GENERATORS: dict[str, Generator] = {}


def generates(*names: str):
    def register(fn: Generator) -> Generator:
        for name in names:
            GENERATORS[name] = fn
        return fn

    return register


def _unary(function: str) -> Generator:
    return lambda b: f"{function}({b.pick().name})"


def _binary(function: str, integer_divisor_is_input: bool = False) -> Generator:
    def generate(b: Builder) -> str | None:
        x = b.pick()
        if integer_divisor_is_input and x.dtype == "i32":
            # jaxlib 0.10.2's XLA:CPU dies of SIGFPE compiling an integer division by a value it can prove is
            # zero (`x - x`): the oracle would kill the fuzzer, so the divisor is an input XLA cannot fold
            return f"{function}({x.name}, {b.arg(x.shape, x.dtype).name})"
        return f"{function}({x.name}, {b.like(x.shape, x.dtype).name})"

    return generate


for _name in ("neg abs sign floor ceil exp exp2 log log1p expm1 tanh logistic sin cos tan sqrt rsqrt cbrt erf "
              "is_finite square stop_gradient optimization_barrier").split():  # fmt: skip
    generates(_name)(_unary(f"lax.{_name}"))
generates("not")(_unary("lax.bitwise_not"))
generates("copy")(_unary("jnp.copy"))
for _name in "add sub mul div rem pow max min atan2 eq ne lt le gt ge".split():
    generates(_name)(_binary(f"lax.{_name}", integer_divisor_is_input=_name in ("div", "rem")))
for _name in ("and", "or", "xor"):
    generates(_name)(_binary(f"lax.bitwise_{_name}"))


def generic_generator(primitive: str) -> Generator | None:
    """For a registered rule without an entry in GENERATORS: ``lax.<name>`` as a unary or binary elementwise
    operation (whichever traces), so that a new elementwise rule is fuzzed the moment it is registered."""
    function = getattr(lax, primitive, None)
    if not callable(function):
        return None
    unary, binary = _unary(f"lax.{primitive}"), _binary(f"lax.{primitive}")
    return lambda b: (unary if b.rng.random() < 0.5 else binary)(b)


@generates("integer_pow")
def _integer_pow(b: Builder) -> str | None:
    x = b.pick()
    return f"lax.integer_pow({x.name}, {int(b.rng.integers(-2, 6))})"


@generates("round")
def _round(b: Builder) -> str | None:
    x = b.pick(lambda v: v.dtype in FLOATS)
    return f"lax.round({x.name}, lax.RoundingMethod.{b.choice(['AWAY_FROM_ZERO', 'TO_NEAREST_EVEN'])})"


@generates("select_n")
def _select_n(b: Builder) -> str | None:
    x = b.pick()
    if b.rng.random() < 0.7:
        which = b.find(lambda v: v.dtype == "pred" and v.shape == x.shape) or b.arg(x.shape, "pred")
        return f"lax.select_n({which.name}, {x.name}, {b.like(x.shape, x.dtype).name})"
    which = b.arg(x.shape, "i32", int_range=(0, 3))
    cases = ", ".join(b.like(x.shape, x.dtype).name for _ in range(2))
    return f"lax.select_n({which.name}, {x.name}, {cases})"


@generates("clamp")
def _clamp(b: Builder) -> str | None:
    x = b.pick(lambda v: v.dtype != "pred")
    lo, hi = sorted(b.rng.integers(-5, 6, size=2).tolist())
    return f"lax.clamp({x.dtype}({lo}), {x.name}, {x.dtype}({hi}))"


@generates("convert_element_type")
def _convert(b: Builder) -> str | None:
    x = b.pick()
    return f"lax.convert_element_type({x.name}, {b.choice(list(DTYPES))})"


@generates("iota")
def _iota(b: Builder) -> str | None:
    shape = b.shape() or (int(b.rng.choice(DIMS)),)
    return f"lax.broadcasted_iota({b.choice(['i32', 'f32', 'bf16'])}, {shape}, {int(b.rng.integers(len(shape)))})"


@generates("broadcast_in_dim")
def _broadcast_in_dim(b: Builder) -> str | None:
    x = b.pick()
    out = [d if d != 1 or b.rng.random() < 0.5 else int(b.rng.choice(DIMS)) for d in x.shape]
    dims = list(range(len(out)))
    for _ in range(int(b.rng.integers(0, 3))):  # new dimensions at random places
        at = int(b.rng.integers(len(out) + 1))
        out.insert(at, int(b.rng.choice(DIMS)))
        dims = [d + (d >= at) for d in dims]
    return f"lax.broadcast_in_dim({x.name}, {tuple(out)}, {tuple(dims)})"


def _factor(n: int, rng: np.random.Generator) -> tuple[int, int] | None:
    divisors = [d for d in range(2, n) if n % d == 0]
    return None if not divisors else (d := int(rng.choice(divisors)), n // d)


@generates("reshape")
def _reshape(b: Builder) -> str | None:
    x = b.pick()
    shape, rng = list(x.shape), b.rng
    kind = int(rng.integers(5))
    if kind == 0:
        shape = [int(np.prod(shape, dtype=np.int64))]
    elif kind == 1 and len(shape) >= 2:  # merge neighbours
        at = int(rng.integers(len(shape) - 1))
        shape[at : at + 2] = [shape[at] * shape[at + 1]]
    elif kind == 2 and shape:  # split one dimension
        at = int(rng.integers(len(shape)))
        factors = _factor(shape[at], rng)
        if factors is None:
            return None
        shape[at : at + 1] = list(factors)
    elif kind == 3:
        shape.insert(int(rng.integers(len(shape) + 1)), 1)
    elif 1 in shape:
        shape.remove(1)
    else:
        return None
    return f"lax.reshape({x.name}, {tuple(shape)})"


@generates("squeeze")
def _squeeze(b: Builder) -> str | None:
    x = b.pick(lambda v: 1 in v.shape)
    return f"lax.squeeze({x.name}, {tuple(d for d, s in enumerate(x.shape) if s == 1)})"


@generates("transpose")
def _transpose(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 2)
    return f"lax.transpose({x.name}, {tuple(int(p) for p in b.rng.permutation(len(x.shape)))})"


@generates("slice")
def _slice(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1)
    starts, limits, strides = [], [], []
    for d in x.shape:
        start = 0 if b.rng.random() < 0.5 else int(b.rng.integers(d))
        starts.append(start)
        limits.append(int(b.rng.integers(start + 1, d + 1)))
        strides.append(2 if b.rng.random() < 0.2 else 1)
    return f"lax.slice({x.name}, {tuple(starts)}, {tuple(limits)}, {tuple(strides)})"


@generates("rev")
def _rev(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1)
    dims = [d for d in range(len(x.shape)) if b.rng.random() < 0.6] or [0]
    return f"lax.rev({x.name}, {tuple(dims)})"


@generates("split")
def _split(b: Builder) -> str | None:
    x = b.pick(lambda v: any(d >= 2 for d in v.shape))
    axis = b.choice([d for d, s in enumerate(x.shape) if s >= 2])
    cut = sorted({int(c) for c in b.rng.integers(1, x.shape[axis], size=int(b.rng.integers(1, 3)))})
    sizes = [hi - lo for lo, hi in zip([0, *cut], [*cut, x.shape[axis]])]
    return f"lax.split({x.name}, {tuple(sizes)}, {axis})"


@generates("concatenate")
def _concatenate(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1)
    axis = int(b.rng.integers(len(x.shape)))
    others = []
    for _ in range(int(b.rng.integers(1, 3))):
        shape = list(x.shape)
        shape[axis] = int(b.rng.choice(DIMS))
        others.append(b.like(shape, x.dtype).name)
    operands = [x.name, *others]
    b.rng.shuffle(operands)
    return f"lax.concatenate([{', '.join(operands)}], {axis})"


def _axes(b: Builder, x: Value) -> tuple[int, ...]:
    return tuple(d for d in range(len(x.shape)) if b.rng.random() < 0.5) or (int(b.rng.integers(len(x.shape))),)


REDUCTIONS = {  # primitive: (combiner, initial value by dtype); lax.reduce turns these monoids into the primitive
    "reduce_sum": ("lax.add", lambda t: 0),
    "reduce_prod": ("lax.mul", lambda t: 1),
    "reduce_max": ("lax.max", lambda t: -(2**31) if t == "i32" else "-inf"),
    "reduce_min": ("lax.min", lambda t: 2**31 - 1 if t == "i32" else "inf"),
    "reduce_and": ("lax.bitwise_and", lambda t: True),
    "reduce_or": ("lax.bitwise_or", lambda t: False),
}


def _reduction(primitive: str) -> Generator:
    combiner, initial = REDUCTIONS[primitive]
    boolean = primitive in ("reduce_and", "reduce_or")

    def generate(b: Builder) -> str | None:
        x = b.pick(lambda v: len(v.shape) >= 1 and (v.dtype == "pred") == boolean)
        # a numpy scalar (not a traced constant) as the initial value, so that lax.reduce recognizes the monoid
        init = f"np.array({initial(x.dtype)}, {x.dtype})[()]"
        return f"lax.reduce({x.name}, {init}, {combiner}, {_axes(b, x)})"

    return generate


for _name in REDUCTIONS:
    generates(_name)(_reduction(_name))


def _cumulative(primitive: str) -> Generator:
    # logsumexp is a float operation: jax.jit cannot lower cumlogsumexp of an integer at all (its identity,
    # -inf, does not convert to int32), so the oracle would fail instead of checking anything
    accept = (lambda v: v.dtype in FLOATS) if primitive == "cumlogsumexp" else (lambda v: v.dtype != "pred")

    def generate(b: Builder) -> str | None:
        x = b.pick(lambda v: len(v.shape) >= 1 and accept(v))
        axis, reverse = int(b.rng.integers(len(x.shape))), bool(b.rng.random() < 0.5)
        return f"lax.{primitive}({x.name}, axis={axis}, reverse={reverse})"

    return generate


for _name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
    generates(_name)(_cumulative(_name))


@generates("top_k")
def _top_k(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1 and v.dtype != "pred")
    return f"lax.top_k({x.name}, {int(b.rng.integers(1, min(x.shape[-1], 8) + 1))})"


@generates("argmax", "argmin")
def _arg_extreme(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1 and v.dtype != "pred")
    return f"lax.{b.choice(['argmax', 'argmin'])}({x.name}, {int(b.rng.integers(len(x.shape)))}, i32)"


@generates("dot_general")
def _dot_general(b: Builder) -> str | None:
    lhs = b.pick(lambda v: len(v.shape) >= 1 and v.dtype != "pred")
    rank, rng = len(lhs.shape), b.rng
    dims = [int(d) for d in rng.permutation(rank)]
    contract = dims[: 1 + (rank >= 3 and rng.random() < 0.3)]
    batch = dims[len(contract) : len(contract) + (rank - len(contract) >= 1 and rng.random() < 0.3)]
    free = [int(rng.choice(DIMS)) for _ in range(int(rng.integers(0, 3 - len(batch))))]
    # rhs dimensions in the order batch, contracting, free, then permuted
    rhs_shape = [lhs.shape[d] for d in batch] + [lhs.shape[d] for d in contract] + free
    perm = [int(p) for p in rng.permutation(len(rhs_shape))]
    position = {old: new for new, old in enumerate(perm)}
    rhs = b.like([rhs_shape[p] for p in perm], lhs.dtype)
    rb = tuple(position[i] for i in range(len(batch)))
    rc = tuple(position[len(batch) + i] for i in range(len(contract)))
    return f"lax.dot_general({lhs.name}, {rhs.name}, (({tuple(contract)}, {rc}), ({tuple(batch)}, {rb})))"


def _start_index(b: Builder, size: int) -> str:
    if b.rng.random() < 0.5:
        return f"i32({int(b.rng.integers(-2, size + 2))})"
    return b.arg((), "i32", int_range=(-2, size + 2)).name


@generates("dynamic_slice")
def _dynamic_slice(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1)
    sizes = tuple(int(b.rng.integers(1, d + 1)) for d in x.shape)
    starts = ", ".join(_start_index(b, d) for d in x.shape)
    return f"lax.dynamic_slice({x.name}, ({starts},), {sizes})"


@generates("dynamic_update_slice")
def _dynamic_update_slice(b: Builder) -> str | None:
    x = b.pick(lambda v: len(v.shape) >= 1)
    update = b.like([int(b.rng.integers(1, d + 1)) for d in x.shape], x.dtype)
    starts = ", ".join(_start_index(b, d) for d in x.shape)
    return f"lax.dynamic_update_slice({x.name}, {update.name}, ({starts},))"


@generates("gather")
def _gather(b: Builder) -> str | None:
    table = b.pick(lambda v: len(v.shape) >= 1)
    rows = table.shape[0]
    shape = (int(b.rng.integers(1, 9)),)
    mode = b.choice(["clip", "fill", None])
    if mode is None:  # plain indexing promises in-bounds indices (negative ones count from the end)
        return f"{table.name}[{b.arg(shape, 'i32', int_range=(-rows, rows)).name}]"
    index = b.arg(shape, "i32", int_range=(-rows - 2, rows + 3))
    return f"jnp.take({table.name}, {index.name}, axis=0, mode={mode!r})"


def generators() -> dict[str, Generator]:
    """A generator for every supported primitive that has one (explicit, or the generic elementwise one)."""
    found = {}
    for primitive in jax_mpk.supported_primitives():
        generate = GENERATORS.get(primitive)
        if generate is None and primitive not in NOT_GENERATED:
            generate = generic_generator(primitive)
        if generate is not None:
            found[primitive] = generate
    return found


def without_generator() -> dict[str, str]:
    """Supported primitives the fuzzer does not generate, with the reason."""
    have = generators()
    return {p: NOT_GENERATED.get(p, "no generator") for p in jax_mpk.supported_primitives() if p not in have}


def _line_avals(expr: str, reads: list[Value]) -> tuple[list[jax.ShapeDtypeStruct], bool]:
    """The line's result types, and whether it gives a sequence of them."""

    def one_line(*operands):
        return eval(expr, dict(SOURCE_NAMESPACE), dict(zip([v.name for v in reads], operands)))  # noqa: S307

    out = jax.eval_shape(one_line, *[v.struct for v in reads])
    return (list(out), True) if isinstance(out, (list, tuple)) else ([out], False)


def generate(seed: int, table: dict[str, Generator] | None = None) -> Program:
    """The program of ``seed``: 4-24 lines drawn uniformly over the primitives, then its outputs and knobs."""
    rng = np.random.default_rng(seed)
    table = table or generators()
    primitives = sorted(table)
    b = Builder(rng)
    for _ in range(int(rng.integers(1, 4))):
        b.arg(b.shape(), b.choice(INPUT_DTYPES))
    target = int(rng.integers(4, 25))
    attempts = 0
    while len(b.lines) < target and attempts < 20 * target:
        attempts += 1
        saved = (list(b.args), list(b.pool))
        try:
            expr = table[b.choice(primitives)](b)
            avals, unpacks = None, False
            if expr is not None:
                avals, unpacks = _line_avals(expr, [v for v in b.pool if v.name in Line((), expr).reads])
        except Exception:  # NoOperand, or operands the primitive does not take (e.g. exp of an int32)
            avals = None
        if not avals or any(np.prod(a.shape, dtype=np.int64) > MAX_ELEMENTS or 0 in a.shape for a in avals):
            b.args, b.pool = saved
            continue
        outs = []
        for aval in avals:
            dtype = next(k for k, t in DTYPES.items() if np.dtype(t) == np.dtype(aval.dtype))
            outs.append(Value(b.name("v") if not outs else f"v{int(outs[-1].name[1:]) + 1}", tuple(aval.shape), dtype))
        b.lines.append(Line(tuple(outs), expr, unpacks))
        b.pool.extend(outs)
    read = set().union(*(ln.reads for ln in b.lines)) if b.lines else set()
    results = [v.name for ln in b.lines for v in ln.outs if v.name not in read or rng.random() < 0.15]
    knobs = Knobs(
        num_workers=int(rng.choice([1, 2, 3, 4, 7])),
        min_task_work=int(rng.choice([16, 256, 4096, 1 << 14])),
        schedule_seed=int(rng.integers(1 << 30)) if rng.random() < 0.5 else None,
    )
    program = Program(seed, tuple(b.args), tuple(b.lines), tuple(results), knobs)
    return program.without_dead_lines()
