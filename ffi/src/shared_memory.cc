#include "jax_mpk/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "jax_mpk/str_cat.h"

namespace jax_mpk {
namespace {

std::runtime_error SystemError(const std::string& what, const std::string& name, int error) {
  return std::runtime_error(StrCat("jax_mpk: ", what, " of shared memory '", name, "' failed: ", std::strerror(error)));
}

}  // namespace

SharedMemory::SharedMemory(const std::string& name, size_t bytes) : bytes_(bytes) {
  if (bytes == 0) throw std::invalid_argument(StrCat("jax_mpk: shared memory '", name, "' of 0 bytes"));
  const int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
  if (fd < 0) throw SystemError("shm_open", name, errno);
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int error = errno;
    close(fd);
    throw SystemError("ftruncate", name, error);
  }
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int error = errno;
  close(fd);  // the mapping keeps the segment
  if (data == MAP_FAILED) throw SystemError("mmap", name, error);
  data_ = data;
}

SharedMemory::~SharedMemory() { munmap(data_, bytes_); }

void SharedMemory::Unlink(const std::string& name) {
  if (shm_unlink(name.c_str()) != 0 && errno != ENOENT) throw SystemError("shm_unlink", name, errno);
}

}  // namespace jax_mpk
