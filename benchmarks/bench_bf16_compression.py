"""How small lossless host copies of bf16 weights could be, and what a GPU decoder would need to make wakes faster.

Not built into gpusleep: this measures the first half of the decision in docs/design.md ("Beyond the link:
compressed host copies"). A bf16 word is a sign bit, 8 exponent bits and 7 mantissa bits; the mantissa and sign
are close to random, the exponent of trained weights is not (a few values carry almost all of it). Coding the
exponent plane alone (the approach of the published lossless codecs) leaves the other 8 bits raw, so a copy
shrinks to (8 + bits per exponent) / 16 of its size.

For each tensor group it reports the exponent plane's Shannon entropy (the bound), the average length of a
Huffman code built for that group (what a per-symbol GPU decoder gets), zlib's ratio on the byte-split planes
(a CPU codec for reference, with its speed on this host), and, for the link rate given (``--link-gbs``, default
55 GB/s, a PCIe 5 x16 pinned copy), the decode rate a GPU decoder must reach for a wake to stay link-bound at
the compressed size. The weights are a checkpoint's bf16 tensors (``--safetensors FILE ...``) or, without one,
gpusleep's demo transformer at a larger size with its initialisation weights (synthetic: give a real checkpoint
for the figure that decides).

    python benchmarks/bench_bf16_compression.py --json /tmp/bf16.json
    python benchmarks/bench_bf16_compression.py --safetensors model-00001-of-00004.safetensors
"""

from __future__ import annotations

import argparse
import heapq
import json
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, emit, format_table, machine, write_json  # noqa: E402

BITS_KEPT_RAW = 8  # sign + 7 mantissa bits of a bf16 word


@dataclass
class Row:
    group: str
    tensors: int
    size_bytes: int
    exponent_entropy_bits: float  # Shannon entropy of the exponent byte, bits per word
    huffman_bits: float  # average Huffman code length of the exponent byte, bits per word
    ratio_entropy: float  # compressed / raw at the entropy bound
    ratio_huffman: float  # compressed / raw with the Huffman code (code tables not counted)
    ratio_zlib: float  # zlib level 1 on the exponent plane + the raw low plane
    zlib_decompress_gbs: float  # output GB/s of zlib's decompression on this host (one thread)
    decode_gbs_needed: float  # GB/s of decoded output a GPU decoder needs to keep a wake link-bound


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length in bits of each symbol of an optimal prefix code for ``counts`` (0 for unused symbols)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = [int(s) for s in np.nonzero(counts)[0]]
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap: list[tuple[int, int, list[int]]] = [(int(counts[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        count_a, order_a, symbols_a = heapq.heappop(heap)
        count_b, _, symbols_b = heapq.heappop(heap)
        for s in symbols_a + symbols_b:
            lengths[s] += 1
        heapq.heappush(heap, (count_a + count_b, order_a, symbols_a + symbols_b))
    return lengths


def measure_group(name: str, words: Sequence[np.ndarray], link_gbs: float) -> Row:
    """``words``: bf16 tensors viewed as uint16."""
    flat = np.concatenate([w.reshape(-1) for w in words]) if words else np.zeros(0, np.uint16)
    if flat.size == 0:
        raise ValueError(f"{name}: no bf16 words")
    exponent = ((flat >> 7) & 0xFF).astype(np.uint8)
    low = ((flat >> 8) & 0x80 | flat & 0x7F).astype(np.uint8)  # sign bit and mantissa
    counts = np.bincount(exponent, minlength=256)
    p = counts[counts > 0] / flat.size
    entropy = float(-(p * np.log2(p)).sum())
    huffman = float((huffman_code_lengths(counts) * counts).sum() / flat.size)
    exponent_bytes, low_bytes = exponent.tobytes(), low.tobytes()
    packed = zlib.compress(exponent_bytes, 1)
    started = time.perf_counter()
    assert zlib.decompress(packed) == exponent_bytes
    seconds = time.perf_counter() - started
    raw_bytes = 2 * flat.size
    ratio_zlib = (len(packed) + len(low_bytes)) / raw_bytes
    ratio_huffman = (BITS_KEPT_RAW + huffman) / 16
    return Row(
        group=name,
        tensors=len(words),
        size_bytes=raw_bytes,
        exponent_entropy_bits=entropy,
        huffman_bits=huffman,
        ratio_entropy=(BITS_KEPT_RAW + entropy) / 16,
        ratio_huffman=ratio_huffman,
        ratio_zlib=ratio_zlib,
        zlib_decompress_gbs=len(exponent_bytes) / seconds / 1e9 if seconds > 0 else float("inf"),
        # The link delivers link_gbs of compressed bytes: link_gbs / ratio of weights per second to decode.
        decode_gbs_needed=link_gbs / ratio_huffman,
    )


def safetensors_bf16(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(group, uint16 words) of every BF16 tensor of a .safetensors file (8-byte header length, JSON, data)."""
    with path.open("rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_bytes))
        data_start = 8 + header_bytes
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    for name, entry in header.items():
        if name == "__metadata__" or entry.get("dtype") != "BF16":
            continue
        begin, end = entry["data_offsets"]
        yield group_of(len(entry["shape"])), np.frombuffer(data[begin:end], dtype=np.uint16)


def demo_weights_bf16() -> Iterator[tuple[str, np.ndarray]]:
    import torch

    from gpusleep.demo.model import TinyTransformer, TinyTransformerConfig

    config = TinyTransformerConfig(vocab_size=8192, d_model=1024, n_layers=4, n_heads=16, d_ff=4096)
    for tensor in TinyTransformer(config).state_dict().values():
        yield group_of(tensor.dim()), tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def group_of(dimensions: int) -> str:
    """Tensors grouped by kind, as a per-group code table would cover them: weight matrices and embeddings, or
    vectors (norms, biases), whose exponents differ."""
    return "matrices" if dimensions >= 2 else "vectors"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--safetensors", type=Path, nargs="+", help="checkpoint files (default: demo weights)")
    parser.add_argument("--link-gbs", type=float, default=55.0, help="host-to-device copy rate, GB/s (default 55)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    if args.safetensors:
        source = ", ".join(p.name for p in args.safetensors)
        tensors = [t for p in args.safetensors for t in safetensors_bf16(p)]
    else:
        source = "gpusleep demo transformer, initialisation weights (synthetic)"
        tensors = list(demo_weights_bf16())
    if not tensors:
        print("bench_bf16_compression: no BF16 tensors found", file=sys.stderr)
        return 1
    groups: dict[str, list[np.ndarray]] = {}
    for group, words in tensors:
        groups.setdefault(group, []).append(words)
    rows = [measure_group(name, words, args.link_gbs) for name, words in sorted(groups.items())]
    rows.append(measure_group("all", [w for _, w in tensors], args.link_gbs))

    print(f"bf16 weights: {source}; link {args.link_gbs:g} GB/s")
    columns = [
        ("group", "group", ""),
        ("tensors", "tensors", "d"),
        ("MiB", "size_mib", ".1f"),
        ("H(exp) bits", "exponent_entropy_bits", ".2f"),
        ("Huffman bits", "huffman_bits", ".2f"),
        ("ratio H", "ratio_entropy", ".3f"),
        ("ratio Huffman", "ratio_huffman", ".3f"),
        ("ratio zlib", "ratio_zlib", ".3f"),
        ("zlib dec GB/s", "zlib_decompress_gbs", ".2f"),
        ("GPU decode GB/s needed", "decode_gbs_needed", ".1f"),
    ]
    table_rows = [dict(vars(r), size_mib=r.size_bytes / MiB) for r in rows]
    print(format_table(table_rows, columns))
    total = rows[-1]
    print(
        f"A wake of these weights moves {total.ratio_huffman:.3f} of the bytes over the link if a GPU decoder turns "
        f"them back into bf16 at >= {total.decode_gbs_needed:.0f} GB/s; host copies shrink by "
        f"{(1 - total.ratio_huffman) * 100:.0f}%."
    )
    payload = {"machine": machine("host CPU (no GPU needed)"), "source": source, "link_gbs": args.link_gbs}
    payload["rows"] = [vars(r) for r in rows]
    write_json(args.json, payload)
    emit(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
