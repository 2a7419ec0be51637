"""Give the memory a finished job freed back to the operating system.

A stage frees gigabytes at paper size (activations, optimiser state, the request's tensors), but
glibc's allocator keeps freed heap pages for reuse, so a site process that stays up between jobs
(a simulation's Ray worker, a long-lived ClientApp) goes on holding its largest job's memory while
it waits. ``malloc_trim(0)`` hands the free pages back; where glibc is not the allocator it is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

from flwr.app import Context, Message


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True when the allocator gave some back."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def release_memory_after_job(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: run the handler, then give back what it freed (the reply keeps its weights)."""
    reply = call_next(msg, context)
    release_freed_memory()
    return reply
