"""A site gives back the memory a finished job freed (clients/memory.py): glibc keeps freed heap
pages for reuse, so without it a long-lived site process holds its largest job's memory while it
waits for the next one; and `crossprobe bench-memory` sees what a process holds."""

from __future__ import annotations

import subprocess
import sys

from clients.app import app
from clients.memory import release_memory_after_job

FREED_THEN_RELEASED = """
from pathlib import Path
from clients.memory import release_freed_memory

def private_mib():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024

pieces = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB in heap-sized pieces
last = pieces[-1]  # the top of the heap stays in use, so only trimming can free the rest
del pieces
before = private_mib()
assert release_freed_memory()
print(before, private_mib())
"""


def test_freed_heap_memory_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", FREED_THEN_RELEASED], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    before, after = map(float, out.split())
    assert before > 250 and before - after > 200, (before, after)


def test_the_clientapp_releases_after_each_job_and_passes_the_reply_on():
    assert release_memory_after_job in app._mods  # after the guard: the reply is already checked
    request, context, reply = object(), object(), object()
    assert release_memory_after_job(request, context, lambda m, c: reply) is reply


def test_bench_memory_sees_a_child_hold_300_mib_privately():
    from simulations.bench_memory import measure

    hold = "import time; x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)"
    res = measure([sys.executable, "-c", hold], every_s=0.2, log=lambda s: None)
    child = max(res["processes"], key=lambda p: p["peak_gib"])
    assert res["exit_code"] == 0
    assert 0.29 < child["at_peak"]["anon"] <= child["at_peak"]["rss"] < 0.5, child["at_peak"]
    assert child["at_peak"]["shmem"] < 0.01 and res["peak_all_gib"] >= 0.29
