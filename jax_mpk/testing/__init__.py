"""Testing tools that ship with jax_mpk: the differential fuzzer (:mod:`jax_mpk.testing.fuzz`)."""
