#include "thread_tag.h"

#include <utility>

#include "tag_policy.h"

namespace gpusleep {
namespace {
thread_local std::string t_tag = kDefaultTag;
}

const std::string& current_thread_tag() { return t_tag; }

std::string exchange_thread_tag(std::string tag) { return std::exchange(t_tag, std::move(tag)); }

}  // namespace gpusleep
