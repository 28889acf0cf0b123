; The chunk hash kernel (definition in chunk_hash.h), in LLVM IR for the NVPTX back end.
;
; This is the source of the PTX text in chunk_hash_ptx.h: scripts/gen_chunk_hash_ptx.sh runs
;     llc -march=nvptx64 -mcpu=sm_70 -mattr=+ptx70
; on it (PTX ISA 7.0, which every CUDA 12 driver JITs; sm_70 code runs on Volta and newer) and writes the header.
; Nothing compiles it at build or run time: the core loads the generated PTX with cuModuleLoadData.
;
; gpusleep_hash_pieces(data, num_bytes, span_words, blocks_per_piece, results)
;   data              the range, 8-byte aligned (device memory)
;   num_bytes         its length; the last word is zero-padded when it is not a multiple of 8
;   span_words        words per block: block b hashes words [b * span_words, (b + 1) * span_words)
;   blocks_per_piece  blocks per piece: block b adds its sum to results[b / blocks_per_piece]
;   results           one zeroed 64-bit sum per piece (device memory); the kernel adds to it with atomics
; Launch: gridDim.x = ceil(words / span_words), blockDim.x a multiple of 32 (the warp reduction uses a full
; mask), no shared memory. Each thread adds up the terms of the words it visits (stride blockDim.x, so a warp
; reads 256 consecutive bytes), a warp adds its 32 sums with shuffles, and lane 0 adds the warp's sum to its
; piece: one atomic per warp and block.

target datalayout = "e-i64:64-i128:128-v16:16-v32:32-n16:32:64"
target triple = "nvptx64-nvidia-cuda"

declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.shfl.sync.bfly.i32(i32, i32, i32, i32)

; SplitMix64's finalizer.
define internal i64 @mix64(i64 %x) alwaysinline {
  %s1 = lshr i64 %x, 30
  %x1 = xor i64 %x, %s1
  %m1 = mul i64 %x1, -4658895280553007687      ; 0xBF58476D1CE4E5B9
  %s2 = lshr i64 %m1, 27
  %x2 = xor i64 %m1, %s2
  %m2 = mul i64 %x2, -7723592293110705685      ; 0x94D049BB133111EB
  %s3 = lshr i64 %m2, 31
  %x3 = xor i64 %m2, %s3
  ret i64 %x3
}

; mix64(word + (index + 1) * step)
define internal i64 @term(i64 %word, i64 %index) alwaysinline {
  %next = add i64 %index, 1
  %scaled = mul i64 %next, -7046029254386353131  ; 0x9E3779B97F4A7C15
  %sum = add i64 %word, %scaled
  %t = call i64 @mix64(i64 %sum)
  ret i64 %t
}

; Adds the 64-bit sums of the 32 lanes of a warp; every lane gets the total.
define internal i64 @warp_sum(i64 %value) alwaysinline {
entry:
  br label %step
step:
  %acc = phi i64 [ %value, %entry ], [ %acc.next, %step ]
  %lane_mask = phi i32 [ 16, %entry ], [ %lane_mask.next, %step ]
  %lo = trunc i64 %acc to i32
  %hi.wide = lshr i64 %acc, 32
  %hi = trunc i64 %hi.wide to i32
  %lo.other = call i32 @llvm.nvvm.shfl.sync.bfly.i32(i32 -1, i32 %lo, i32 %lane_mask, i32 31)
  %hi.other = call i32 @llvm.nvvm.shfl.sync.bfly.i32(i32 -1, i32 %hi, i32 %lane_mask, i32 31)
  %lo.other.wide = zext i32 %lo.other to i64
  %hi.other.wide = zext i32 %hi.other to i64
  %hi.other.shifted = shl i64 %hi.other.wide, 32
  %other = or i64 %hi.other.shifted, %lo.other.wide
  %acc.next = add i64 %acc, %other
  %lane_mask.next = lshr i32 %lane_mask, 1
  %more = icmp ne i32 %lane_mask.next, 0
  br i1 %more, label %step, label %done
done:
  ret i64 %acc.next
}

define void @gpusleep_hash_pieces(i8* %data, i64 %num_bytes, i64 %span_words, i64 %blocks_per_piece,
                                  i64* %results) {
entry:
  %tid32 = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %ntid32 = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  %ctaid32 = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %tid = zext i32 %tid32 to i64
  %ntid = zext i32 %ntid32 to i64
  %ctaid = zext i32 %ctaid32 to i64
  %data.global = addrspacecast i8* %data to i8 addrspace(1)*
  %words.global = bitcast i8 addrspace(1)* %data.global to i64 addrspace(1)*
  %full_words = lshr i64 %num_bytes, 3
  %tail_bytes = and i64 %num_bytes, 7
  %has_tail = icmp ne i64 %tail_bytes, 0
  %tail_words = zext i1 %has_tail to i64
  %all_words = add i64 %full_words, %tail_words
  %start = mul i64 %ctaid, %span_words
  %span_end = add i64 %start, %span_words
  %span_past = icmp ugt i64 %span_end, %all_words
  %end = select i1 %span_past, i64 %all_words, i64 %span_end
  %first = add i64 %start, %tid
  br label %loop

loop:
  %i = phi i64 [ %first, %entry ], [ %i.next, %join ]
  %acc = phi i64 [ 0, %entry ], [ %acc.next, %join ]
  %in_span = icmp ult i64 %i, %end
  br i1 %in_span, label %body, label %reduce

body:
  %is_full = icmp ult i64 %i, %full_words
  br i1 %is_full, label %full, label %tail

full:
  %word.ptr = getelementptr inbounds i64, i64 addrspace(1)* %words.global, i64 %i
  %word.full = load i64, i64 addrspace(1)* %word.ptr, align 8
  br label %join

tail:  ; the last, partial word: its bytes one by one, little-endian, zero-padded
  %tail.base = shl i64 %i, 3
  br label %tail.loop
tail.loop:
  %j = phi i64 [ 0, %tail ], [ %j.next, %tail.loop ]
  %word.part = phi i64 [ 0, %tail ], [ %word.part.next, %tail.loop ]
  %byte.index = add i64 %tail.base, %j
  %byte.ptr = getelementptr inbounds i8, i8 addrspace(1)* %data.global, i64 %byte.index
  %byte = load i8, i8 addrspace(1)* %byte.ptr, align 1
  %byte.wide = zext i8 %byte to i64
  %bit.shift = shl i64 %j, 3
  %byte.placed = shl i64 %byte.wide, %bit.shift
  %word.part.next = or i64 %word.part, %byte.placed
  %j.next = add i64 %j, 1
  %tail.more = icmp ult i64 %j.next, %tail_bytes
  br i1 %tail.more, label %tail.loop, label %join

join:
  %word = phi i64 [ %word.full, %full ], [ %word.part.next, %tail.loop ]
  %t = call i64 @term(i64 %word, i64 %i)
  %acc.next = add i64 %acc, %t
  %i.next = add i64 %i, %ntid
  br label %loop

reduce:
  %warp.total = call i64 @warp_sum(i64 %acc)
  %lane = and i64 %tid, 31
  %is_lane0 = icmp eq i64 %lane, 0
  br i1 %is_lane0, label %publish, label %exit

publish:
  %piece = udiv i64 %ctaid, %blocks_per_piece
  %results.global = addrspacecast i64* %results to i64 addrspace(1)*
  %slot = getelementptr inbounds i64, i64 addrspace(1)* %results.global, i64 %piece
  %old = atomicrmw add i64 addrspace(1)* %slot, i64 %warp.total monotonic
  br label %exit

exit:
  ret void
}

!nvvm.annotations = !{!0}
!0 = !{void (i8*, i64, i64, i64, i64*)* @gpusleep_hash_pieces, !"kernel", i32 1}
