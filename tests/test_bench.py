"""`crossprobe bench`'s fused-inference stage runs every path it reports (speeds are measured, not
asserted: docs/segment.md has the figures)."""

from __future__ import annotations

import pytest

from simulations.bench import FUSED_BATCHES, run_bench


def test_bench_fused_reports_every_path_at_batch_1_and_32():
    pytest.importorskip("onnxruntime")
    res = run_bench("configs/tiny.yaml", stages=("fused",), iters=1, warmup=0)
    paths = ("fused_sequential", "fused_threads", "fused_onnxruntime", "fused_onnxruntime_parallel")
    for n in FUSED_BATCHES:
        assert res[f"b{n}_single_frames_per_s"] > 0
        for path in paths:
            assert res[f"b{n}_{path}_frames_per_s"] > 0
            assert res[f"b{n}_{path}_over_single_time"] > 0
