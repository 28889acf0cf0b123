"""Generate fakecuda_errors.inc: the C initializers {code, name, text} of every CUresult in a cuda.h, so that the
simulated GPU's cuGetErrorName / cuGetErrorString answer the exact spellings of the header it was built with.

Used by CMakeLists.txt (the simulated GPU shipped in the wheel) and by tests/fakecuda/harness.py (the same
double, built for the tests): ``python gen_error_table.py CUDA_H OUT``.
"""

from __future__ import annotations

import re
import sys

#: Real driver strings for the common codes; other codes use cuda.h's comment.
ERROR_TEXT = {
    0: "no error",
    1: "invalid argument",
    2: "out of memory",
    3: "initialization error",
    100: "no CUDA-capable device is detected",
    101: "invalid device ordinal",
    201: "invalid device context",
    400: "invalid resource handle",
    401: "the operation cannot be performed in the present state",
    600: "device not ready",
    700: "an illegal memory access was encountered",
    712: "part or all of the requested memory range is already mapped",
    713: "pointer does not correspond to a registered memory region",
    801: "operation not supported",
    900: "operation not permitted when stream is capturing",
    901: "operation failed due to a previous error during capture",
    906: "operation would make the legacy stream depend on a capturing blocking stream",
    907: "operation not permitted on an event last recorded in a capturing stream",
    908: "attempt to terminate a thread-local capture sequence from another thread",
    999: "unknown error",
}


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def error_table(cuda_h: str) -> str:
    """C initializers {code, name, text} for every CUresult in cuda.h."""
    m = re.search(r"typedef enum cudaError_enum \{(.*?)\}\s*CUresult;", cuda_h, re.S)
    if not m:
        raise RuntimeError("fakecuda: cuda.h has no cudaError_enum")
    body = m.group(1)
    rows = []
    for doc, name, value in re.findall(r"/\*\*(.*?)\*/\s*(CUDA_\w+)\s*=\s*(\d+)", body, re.S):
        code = int(value)
        text = ERROR_TEXT.get(code)
        if text is None:
            words = " ".join(w for line in doc.splitlines() for w in line.strip().lstrip("*").split())
            words = words.replace("\\deprecated", "").replace("::", "").strip()
            text = re.split(r"(?<=\.)\s", words, maxsplit=1)[0].rstrip(".") or name
        rows.append(f"    {{{code}, {_c_string(name)}, {_c_string(text)}}},")
    if not any(r.startswith("    {0,") for r in rows):
        raise RuntimeError("fakecuda: could not parse cudaError_enum in cuda.h")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python gen_error_table.py CUDA_H OUT")
    with open(sys.argv[1], errors="replace") as f:
        table = error_table(f.read())
    with open(sys.argv[2], "w") as f:
        f.write(table)
