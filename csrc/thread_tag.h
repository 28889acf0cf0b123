// The tag of the calling thread: what allocations made now are filed under. Thread-local, so that threads
// tagging different work never see each other's tag; Python's Allocator.tag() sets and restores it.
#pragma once

#include <string>

namespace gpusleep {

const std::string& current_thread_tag();
// Sets this thread's tag and returns the previous one.
std::string exchange_thread_tag(std::string tag);

}  // namespace gpusleep
