"""Every error jax_mpk raises on purpose derives from :class:`MegakernelError`."""

from __future__ import annotations


class MegakernelError(Exception):
    """Base class of jax_mpk's errors."""


class UnsupportedPrimitiveError(MegakernelError, NotImplementedError):
    """The traced function uses a primitive (or a form of one) that jax_mpk cannot lower."""

    def __init__(self, primitive: str, source: str = "", detail: str = ""):
        self.primitive = primitive
        self.source = source
        self.refusals: list[UnsupportedPrimitiveError] = [self]  # every refused equation of the function
        where = f" at {source}" if source else ""
        why = f": {detail}" if detail else ""
        super().__init__(f"jax_mpk cannot lower primitive '{primitive}'{where}{why}")

    @classmethod
    def of_all(cls, refusals: list[UnsupportedPrimitiveError]) -> UnsupportedPrimitiveError:
        """One error listing every refusal (each primitive and source line once), so that all can be fixed in
        one go; ``primitive`` and ``source`` are the first one's."""
        unique = list({(r.primitive, r.source): r for r in refusals}.values())
        if len(unique) == 1:
            return unique[0]
        error = cls(unique[0].primitive, unique[0].source)
        error.refusals = unique
        lines = "\n".join(f"  {r}" for r in unique)
        error.args = (f"jax_mpk cannot lower {len(unique)} equations of the function:\n{lines}",)
        return error


class InvalidArgumentError(MegakernelError, ValueError):
    """A knob (environment variable) or an argument of megakernelize/compile has a value jax_mpk cannot use."""


class UnsupportedDtypeError(MegakernelError, TypeError):
    """A value has a dtype the runtime does not implement."""


class SignatureMismatchError(MegakernelError, TypeError):
    """Arguments do not match the signature a compiled megakernel was traced for."""


class GraphTooLargeError(MegakernelError, ValueError):
    """The task graph or its workspace exceeds what the target can hold."""


class DependencyTimeoutError(MegakernelError, RuntimeError):
    """A task waited longer than the watchdog allows for a dependency that never completed."""


class InvalidTaskGraphError(MegakernelError, AssertionError):
    """The task-graph validator found a missing dependency, a write race or a deadlocking schedule."""


class CompileError(MegakernelError, RuntimeError):
    """nvcc is missing or rejected a generated megakernel; the message holds the command to reproduce."""
