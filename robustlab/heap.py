"""Keep the C heap from holding on to freed batch buffers, so an audit's memory does not grow with its length.

PyTorch's CPU tensors come from malloc. glibc serves large blocks with mmap and returns them on
free, but after the first such free it raises its mmap threshold (up to 32 MiB), so later
activation buffers of a few MiB come from the heap instead, where fragmentation keeps them: a
10,000-image audit then peaked 250 MiB above a 1,000-image one with the same batches
(bench/scale.py). A fixed 1 MiB threshold (mallopt M_MMAP_THRESHOLD, which also turns the dynamic
adjustment off) sends every large buffer back to the system when it is freed. The CLI sets it;
a library should not change a process's allocator on import, so API users call `bound()` themselves
(or set MALLOC_MMAP_THRESHOLD_=1048576 in the environment).
"""

from __future__ import annotations

from robustlab.atomic import _libc

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
THRESHOLD = 1 << 20


def bound(threshold: int = THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes or more with mmap; True if the setting took (glibc: other C
    libraries have no mallopt, or no such option, and are left as they are)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) if mallopt is not None else False
