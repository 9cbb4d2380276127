// Addresses in the communication buffers of a plan that several devices run (a shard_map body). Every rank's
// buffer holds every rank's slot of each COMM tensor: a slot's writer stores it into all ranks' buffers (over
// NVLink for the others), and a reader reads its own buffer, as it reads the workspace: with vector loads, in
// a product's staging, from its L2, and without a round trip to another GPU per element.
#pragma once

#include <cstdint>

#include "jax_mpk/runtime/params.h"

namespace jax_mpk::comm {

// Byte offset of this call's half of every communication buffer (call e, counted from 1, uses half e % 2).
// Control::epoch holds the calls completed, and changes only once every task of the call has run.
__device__ __forceinline__ int64_t half_offset(const MegakernelParams& p) {
  return static_cast<int64_t>((p.control->epoch + 1) & 1) * p.comm.half_bytes;
}

// This call's half of this rank's buffer: where its COMM tensors are read.
__device__ __forceinline__ char* local(const MegakernelParams& p) { return p.comm.peers[p.comm.rank] + half_offset(p); }

// `base` is an address in this rank's buffer; the same place in rank `rank`'s buffer.
__device__ __forceinline__ char* on_rank(const MegakernelParams& p, char* base, int rank) {
  return p.comm.peers[rank] + (base - p.comm.peers[p.comm.rank]);
}

}  // namespace jax_mpk::comm
