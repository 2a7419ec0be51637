"""`crossprobe bench-signing` times every step a reply takes, on the experiment's own model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from crossprobe.cli import app


def test_bench_signing_times_each_step_of_one_reply_of_the_configs_model(tmp_path):
    out = tmp_path / "signing.json"
    result = CliRunner().invoke(
        app, ["bench-signing", "--config", "configs/tiny.yaml", "--repeats", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    assert set(numbers["seconds"]) == {
        "describe (hash + scan)", "contract check", "digest", "sign", "verify"
    }  # fmt: skip
    assert all(s > 0 for s in numbers["seconds"].values())
    # the reply carries every parameter: at least 4 bytes each (fp32 weights)
    assert numbers["reply_bytes"] >= 4 * numbers["parameters"] > 0
    assert "sign + verify" in result.output
