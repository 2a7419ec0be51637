"""The coordinator as a Flower ServerApp: read the run settings, load the experiment, run the phases.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``--run-config``):
``experiment`` (YAML; relative paths resolve against the app folder), ``run-dir`` (results, phases,
report; "" = ``runs/<experiment name>``), ``sites-root`` (simulated site data; "" = ``<run-dir>/data``),
``timeout-query`` / ``timeout-train`` / ``timeout-evaluate`` (seconds per round), ``node-wait``
(seconds to wait for the nodes), ``min-nodes`` (0 = one per site of the experiment).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ExperimentConfig, load_experiment
from server.workflow import Settings, Workflow

APP_DIR = Path(__file__).resolve().parents[1]

app = ServerApp()


def _path(value: object, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (base / p)


def settings_from(run_config: dict, cfg: ExperimentConfig) -> Settings:
    """Typed run settings; relative run/site folders resolve against the working directory."""
    cwd = Path.cwd()
    run_dir = _path(run_config.get("run-dir") or f"runs/{cfg.name}", cwd)
    sites_root = _path(run_config.get("sites-root") or run_dir / "data", cwd)
    return Settings(
        run_dir=run_dir,
        sites_root=sites_root,
        timeout_query=float(run_config.get("timeout-query", 120)),
        timeout_train=float(run_config.get("timeout-train", 43_200)),
        timeout_evaluate=float(run_config.get("timeout-evaluate", 3_600)),
        node_wait=float(run_config.get("node-wait", 120)),
        min_nodes=int(run_config.get("min-nodes", 0)),
    )


def load(run_config: dict) -> tuple[ExperimentConfig, Settings]:
    """Only the server loads the experiment; sites get the flat stage config on the wire."""
    cfg = load_experiment(_path(run_config.get("experiment", "configs/tiny.yaml"), APP_DIR))
    return cfg, settings_from(run_config, cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, settings = load(dict(context.run_config))
    Workflow(grid, cfg, settings, log=lambda line: print(line, flush=True)).run()
