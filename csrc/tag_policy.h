// What a level-1 sleep does with a tag. Level 2 discards every tag whose policy is not kKeep.
#pragma once

#include <string>

#include "errors.h"

namespace gpusleep {

enum class TagPolicy { kOffload, kDiscard, kKeep };

inline const char* tag_policy_name(TagPolicy policy) {
  switch (policy) {
    case TagPolicy::kOffload: return "offload";
    case TagPolicy::kDiscard: return "discard";
    case TagPolicy::kKeep: return "keep";
  }
  return "?";
}

inline TagPolicy parse_tag_policy(const std::string& name) {
  if (name == "offload") return TagPolicy::kOffload;
  if (name == "discard") return TagPolicy::kDiscard;
  if (name == "keep") return TagPolicy::kKeep;
  throw InvalidArgument("unknown tag policy '" + name + "': use 'offload', 'discard' or 'keep'");
}

constexpr const char* kDefaultTag = "default";
constexpr const char* kWeightsTag = "weights";

// "weights" is offloaded, the untagged "default" tag stays resident, every other tag is discarded.
inline TagPolicy default_tag_policy(const std::string& tag) {
  if (tag == kWeightsTag) return TagPolicy::kOffload;
  if (tag == kDefaultTag) return TagPolicy::kKeep;
  return TagPolicy::kDiscard;
}

}  // namespace gpusleep
