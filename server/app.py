"""The coordinator as a Flower ServerApp: read the run settings, load the experiment, run the
phases.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml — the one place their defaults are
written — overridable with ``flwr run --run-config``): ``experiment`` (YAML; relative paths resolve
against the app folder), ``run-dir`` (results, phases, report; "" = ``runs/<experiment name>``),
``sites-root`` (simulated site data; "" = ``<run-dir>/data``), ``timeout-query`` /
``timeout-train`` / ``timeout-evaluate`` (seconds per round), ``node-wait`` (seconds to wait for
the nodes), ``min-nodes`` (0 = one per site of the experiment), ``site-keys`` (the folder of each
site's registered public key ``<site>.pub``, against which every reply's signature is verified;
"" = ``<run-dir>/keys``, where the simulator makes them), ``max-eval-frames`` (the most labeled
frames a site is asked to score per split: the server's own bound on every score vector).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, ExperimentConfig, load_experiment
from server.workflow import Settings, Workflow

APP_DIR = Path(__file__).resolve().parents[1]

app = ServerApp()


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml: what Flower gives ``context.run_config``
    before any ``--run-config`` override (for runners that bypass Flower's CLI)."""
    with open(APP_DIR / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def _path(value: object, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (base / p)


def _setting(run_config: dict, key: str) -> Any:
    if key not in run_config:
        raise ConfigError(
            f"run config has no {key!r} (its default belongs in pyproject.toml "
            "[tool.flwr.app.config])"
        )
    return run_config[key]


def settings_from(run_config: dict, cfg: ExperimentConfig) -> Settings:
    """Typed run settings; relative run/site folders resolve against the working directory."""
    cwd = Path.cwd()
    run_dir = _path(_setting(run_config, "run-dir") or f"runs/{cfg.name}", cwd)
    sites_root = _path(_setting(run_config, "sites-root") or run_dir / "data", cwd)
    site_keys = _path(_setting(run_config, "site-keys") or run_dir / "keys", cwd)
    max_eval_frames = _setting(run_config, "max-eval-frames")
    if (
        not isinstance(max_eval_frames, int)
        or isinstance(max_eval_frames, bool)
        or (max_eval_frames < 1)
    ):
        raise ConfigError(f"run config max-eval-frames = {max_eval_frames!r}: a whole number ≥ 1")
    return Settings(
        run_dir=run_dir,
        sites_root=sites_root,
        timeout_query=float(_setting(run_config, "timeout-query")),
        timeout_train=float(_setting(run_config, "timeout-train")),
        timeout_evaluate=float(_setting(run_config, "timeout-evaluate")),
        node_wait=float(_setting(run_config, "node-wait")),
        min_nodes=int(_setting(run_config, "min-nodes")),
        site_keys=site_keys,
        max_eval_frames=max_eval_frames,
    )


def load(run_config: dict) -> tuple[ExperimentConfig, Settings]:
    """Only the server loads the experiment; sites get the flat stage config on the wire."""
    cfg = load_experiment(_path(_setting(run_config, "experiment"), APP_DIR))
    return cfg, settings_from(run_config, cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, settings = load(dict(context.run_config))
    Workflow(grid, cfg, settings, log=lambda line: print(line, flush=True)).run()
