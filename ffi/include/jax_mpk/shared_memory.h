// A POSIX shared-memory segment mapped into this process: the communication buffers of a plan whose ranks run in
// several processes (one process per device, jax.distributed) live in one, so that every process sees the
// others' buffers and counters.
#pragma once

#include <cstddef>
#include <string>

namespace jax_mpk {

class SharedMemory {
 public:
  // Opens the segment `name` ("/name", at most NAME_MAX bytes), creating it when no process has yet, sized
  // `bytes` (> 0), and maps it shared. Every process of a run opens the same name with the same size, in any
  // order: a fresh segment's pages are zero, and extending it to the size it already has changes nothing.
  // Throws std::runtime_error naming the call that failed.
  SharedMemory(const std::string& name, size_t bytes);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  void* data() const { return data_; }

  // Removes the name from the system (the mappings stay valid); a name already removed is no error. Called once
  // every process has mapped the segment, so that nothing is left in /dev/shm whatever happens later.
  // Throws std::runtime_error on another failure.
  static void Unlink(const std::string& name);

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace jax_mpk
