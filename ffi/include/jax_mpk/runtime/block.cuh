// The thread count of every megakernel CTA, fixed at compile time: the generated source defines
// JAX_MPK_BLOCK_THREADS (the launch uses the same number) before including any task header, so that
// strided loops over a tile have compile-time trip counts and can issue all their loads at once.
#pragma once

#ifndef JAX_MPK_BLOCK_THREADS
#error "define JAX_MPK_BLOCK_THREADS (the megakernel's CTA size) before including jax_mpk headers"
#endif

namespace jax_mpk {
inline constexpr int kBlockThreads = JAX_MPK_BLOCK_THREADS;
static_assert(kBlockThreads % 32 == 0, "whole warps");
}  // namespace jax_mpk
