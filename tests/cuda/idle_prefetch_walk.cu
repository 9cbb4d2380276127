// Host test of the idle prefetch's cursor (IdlePrefetch in runtime/megakernel.cuh), which runs on the GPU only
// while an SM waits and whose mistakes would not show in results: a worker's tasks are waited for in order, a few
// or many prefetch rounds each; checked after every round: the cursor only requests tasks from the waited one on
// (the waited one's own spans only if its prefetch() does not stream them), never a line of a later task twice,
// its `ahead` is exactly the lines requested for tasks after the waited one, and never more than the budget plus
// one round. Prints "ok" and exits 0, or names the first violation and exits 1.
#include <cstdio>
#include <map>
#include <tuple>
#include <vector>

#include "jax_mpk/runtime/megakernel.cuh"

using jax_mpk::IdlePrefetch;
using jax_mpk::TileSpan;

struct FakeTask {
  TileSpan parts[jax_mpk::kStreamedParts];
  bool streams_before_wait;
};

struct FakeSpans {
  const std::vector<FakeTask>& tasks;
  TileSpan span(int32_t position, int part) { return tasks[position].parts[part]; }
  bool streams_before_wait(int32_t position) { return tasks[position].streams_before_wait; }
};

int fail(const char* what, int waited, int round) {
  std::printf("FAILED: %s (waiting for task %d, round %d)\n", what, waited, round);
  return 1;
}

int main() {
  static char memory[1 << 20];
  auto span = [&](int64_t offset, int64_t row_bytes, int64_t rows, int64_t stride) {
    return TileSpan{memory + offset, row_bytes, rows, stride};
  };
  // products (one span, streamed by their prefetch()), attention chunks (keys and values, not), a task with none;
  // rows of 96 bytes at a 32-byte offset take 2 lines each (lines_aligned)
  const std::vector<FakeTask> tasks = {
      {{span(0, 256, 40, 4096), {}}, true},          {{span(4096, 128, 16, 1024), span(8192, 128, 16, 1024)}, false},
      {{span(32, 96, 70, 8192), {}}, true},          {{{}, {}}, false},
      {{span(640, 256, 300, 2048), {}}, true},       {{span(4096, 128, 8, 1024), span(8192, 128, 8, 1024)}, false},
      {{span(128, 512, 30, 4096), {}}, true},
  };
  const int end = static_cast<int>(tasks.size());
  const int64_t budget_lines = 120;
  const int width = 32;
  FakeSpans spans{tasks};
  std::map<std::tuple<int, int, int64_t>, int> requested;  // (task, part, line) -> times
  IdlePrefetch look;
  look.reset(0);
  for (int waited = 0; waited < end; ++waited) {
    look.begin_wait(waited, spans);
    const int rounds = waited % 2 ? 1000 : 2;  // a short wait, then a long one
    for (int round = 0; round < rounds; ++round) {
      int64_t first, count;
      if (!look.next_round(waited, end, budget_lines, width, spans, &first, &count)) break;
      if (look.position < waited) return fail("a task already waited for", waited, round);
      if (look.position == waited && tasks[waited].streams_before_wait) return fail("a self-streamed task", waited, round);
      if (count < 1 || count > width) return fail("a round's width", waited, round);
      for (int64_t line = first; line < first + count; ++line) {
        int& times = requested[{look.position, look.part, line}];
        if (++times > 1 && look.position > waited) return fail("a later task's line twice", waited, round);
      }
      int64_t later = 0;
      for (const auto& [key, times] : requested) later += std::get<0>(key) > waited;
      if (look.ahead != later) return fail("ahead is not the lines requested for later tasks", waited, round);
      if (look.ahead > budget_lines + width) return fail("more than the budget ahead", waited, round);
    }
  }
  // every line of task 1's keys and values (an attention chunk) was requested: the long wait for task 1 covers them
  for (int part = 0; part < 2; ++part)
    for (int64_t line = 0; line < tasks[1].parts[part].lines(); ++line)
      if (!requested.count({1, part, line})) return fail("an attention chunk's line never requested", 1, -1);
  std::printf("ok: %zu lines requested\n", requested.size());
  return 0;
}
