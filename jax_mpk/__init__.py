"""jax_mpk: compile a JAX function into one persistent megakernel run as a single XLA FFI call."""

from .api import Megakernel, compile, megakernelize
from .errors import (
    DependencyTimeoutError, GraphTooLargeError, InvalidArgumentError, InvalidTaskGraphError, MegakernelError,
    SignatureMismatchError, UnsupportedDtypeError, UnsupportedPrimitiveError,
)  # fmt: skip
from .lowering import supported_primitives

__version__ = "0.1.0"

__all__ = [
    "DependencyTimeoutError", "GraphTooLargeError", "InvalidArgumentError", "InvalidTaskGraphError", "Megakernel", "MegakernelError",
    "SignatureMismatchError", "UnsupportedDtypeError", "UnsupportedPrimitiveError", "compile", "megakernelize",
    "supported_primitives",
]  # fmt: skip
