// The chunk hash: what verified wakes and changed-piece re-sleeps compare (Note [Verified wakes] in allocator.h).
//
// Definition, for a range of n bytes read as little-endian 64-bit words w_0 .. w_{m-1} (m = ceil(n / 8), the
// last word zero-padded when n is not a multiple of 8):
//     term(i)  = mix64(w_i + (i + 1) * kChunkHashStep)        (mod 2^64)
//     hash     = sum over i of term(i)                        (mod 2^64)
// where mix64 is the SplitMix64 finalizer. A sum of per-word terms does not depend on the order the words
// are visited in, so the GPU kernel hashes every word in parallel and adds the partial sums with atomics; the
// word's position enters each term, so moved, swapped, shifted and lost bytes change the hash (a flipped bit
// changes its term completely). It detects accidents (a bad copy, a wrong offset, a lost tail), not an
// adversary. A range is hashed in pieces of `piece_bytes` (a multiple of 8); every word keeps its index in
// the whole range, so the hash of the range is the sum of its pieces' hashes.
//
// This file is the host twin of the kernel in chunk_hash_kernel.ll (whose PTX is chunk_hash_ptx.h): the core
// uses it when the kernel cannot be loaded (hashing host copies and read-back bytes) and the driver double
// (tests/fakecuda) runs it when the core launches the kernel by name. Both must compute the same numbers;
// tests/core/test_core_verified_wake.py checks this twin against an independent Python reference, and a GPU test
// checks the kernel against this twin.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace gpusleep {

constexpr uint64_t kChunkHashStep = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio, odd

inline uint64_t chunk_hash_mix64(uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t chunk_hash_term(uint64_t word, uint64_t word_index) noexcept {
  return chunk_hash_mix64(word + (word_index + 1) * kChunkHashStep);
}

// The sum of the terms of bytes [0, num_bytes) of `data`, whose first word has index `first_word_index` in the
// range being hashed. `data` needs no alignment.
inline uint64_t chunk_hash_bytes(const unsigned char* data, size_t num_bytes, uint64_t first_word_index) noexcept {
  uint64_t sum = 0;
  const size_t full_words = num_bytes / 8;
  for (size_t i = 0; i < full_words; ++i) {
    uint64_t word;
    std::memcpy(&word, data + 8 * i, 8);  // little-endian hosts only (x86-64, aarch64)
    sum += chunk_hash_term(word, first_word_index + i);
  }
  const size_t tail_bytes = num_bytes % 8;
  if (tail_bytes != 0) {
    uint64_t word = 0;
    std::memcpy(&word, data + 8 * full_words, tail_bytes);
    sum += chunk_hash_term(word, first_word_index + full_words);
  }
  return sum;
}

// Hashes a range delivered in consecutive parts (host extents, shadow pages of the double) into one hash per
// piece of `piece_bytes` bytes. Parts may end anywhere, mid-word included.
class ChunkHasher {
 public:
  explicit ChunkHasher(size_t piece_bytes) : piece_bytes_(piece_bytes) {}

  void add(const unsigned char* data, size_t num_bytes) {
    while (num_bytes > 0) {
      if (pending_bytes_ == 0 && num_bytes >= 8 && (offset_ % piece_bytes_) + 8 <= piece_bytes_) {
        // Whole words up to the end of this part or of the current piece.
        const size_t piece_left = piece_bytes_ - offset_ % piece_bytes_;
        const size_t run = std::min(num_bytes, piece_left) / 8 * 8;
        piece_sum(offset_) += chunk_hash_bytes(data, run, offset_ / 8);
        data += run;
        num_bytes -= run;
        offset_ += run;
        continue;
      }
      pending_[pending_bytes_++] = *data++;
      --num_bytes;
      if (pending_bytes_ == 8) flush_word();
    }
  }

  // The piece hashes of everything added; the last piece may be short.
  std::vector<uint64_t> finish() {
    if (pending_bytes_ != 0) flush_word();
    return std::move(pieces_);
  }

 private:
  uint64_t& piece_sum(size_t byte_offset) {
    const size_t piece = byte_offset / piece_bytes_;
    if (pieces_.size() <= piece) pieces_.resize(piece + 1, 0);
    return pieces_[piece];
  }
  void flush_word() {
    uint64_t word = 0;
    std::memcpy(&word, pending_, pending_bytes_);
    piece_sum(offset_) += chunk_hash_term(word, offset_ / 8);
    offset_ += pending_bytes_;
    pending_bytes_ = 0;
  }

  size_t piece_bytes_;
  size_t offset_ = 0;  // bytes hashed so far (whole words only)
  unsigned char pending_[8] = {};
  size_t pending_bytes_ = 0;
  std::vector<uint64_t> pieces_;
};

// The piece hashes of a contiguous range.
inline std::vector<uint64_t> chunk_hash_pieces(const unsigned char* data, size_t num_bytes, size_t piece_bytes) {
  ChunkHasher hasher(piece_bytes);
  hasher.add(data, num_bytes);
  return hasher.finish();
}

}  // namespace gpusleep
