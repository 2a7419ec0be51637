"""``crossprobe experiment NAME``: a study = one federated run per seed, then the tables.

``NAME`` is ``configs/experiments/NAME.yaml`` (or a path). Each seed runs the real federated
workflow (``crossprobe simulate``) in ``<run-root>/<name>/seed-<s>/`` on site data shared by the
seeds (``<run-root>/<name>/data``: same frames, so scores pair across seeds); a finished seed whose
config has not changed is not run again. With ``study.finetune_repeats: k`` each seed fine-tunes and
evaluates k times on its own pretrained encoders: repeat r > 0 runs in ``seed-<s>-repeat-<r>/``,
which starts from a copy of ``seed-<s>``'s pretraining phase, and the seed is scored as the mean of
its repeats (``server/repeats.py``). Then ``server/study.py`` turns the ``results.json`` files into
``study.json``, ``study.md`` and figures under ``<run-root>/<name>/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from common.config import ConfigError, ExperimentConfig, dump_experiment, load_experiment
from common.lock import locked
from common.signals import stop_signals_raise

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def resolve(name: str | Path) -> Path:
    """A path to an experiment YAML, or the name of one in ``configs/experiments``.

    Raises:
        ConfigError: neither exists (the message lists the known names).
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: experiment config not found")
        return path
    cand = EXPERIMENTS_DIR / f"{name}.yaml"
    if cand.is_file():
        return cand
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"no experiment {str(name)!r}; known: {', '.join(known)} (or give a path)")


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The experiment one seed runs: ``seed`` set; on a seed outside ``study.variant_seeds`` only
    the ``every_seed`` variants (and the pairs whose arms all run)."""
    study = cfg.study
    if study.variant_seeds is not None and seed not in study.variant_seeds:
        keep = tuple(v for v in study.variants if v.every_seed)
        dropped = {v.name for v in study.variants} - {v.name for v in keep}
        pairs = tuple(x for x in study.pairs if not dropped & set(x))
        study = study.model_copy(update={"variants": keep, "pairs": pairs})
    return cfg.model_copy(update={"seed": seed, "study": study})


def repeat_config(cfg: ExperimentConfig, repeat: int) -> ExperimentConfig:
    """The run of one seed's fine-tuning repeat (``finetune.repeat``; 0 is the seed's own run)."""
    return cfg.model_copy(
        update={"finetune": cfg.finetune.model_copy(update={"repeat": repeat})}
    )  # fmt: skip


def repeat_dirs(out: Path, seed: int, repeats: int) -> list[Path]:
    """Where each fine-tuning repeat of ``seed`` runs: ``seed-<s>``, then ``seed-<s>-repeat-<r>``
    (r ≥ 1)."""
    return [out / (f"seed-{seed}" + (f"-repeat-{r}" if r else "")) for r in range(repeats)]


def _done(run_dir: Path, cfg_text: str) -> bool:
    cfg_file = run_dir / "experiment.yaml"
    return (
        (run_dir / "results.json").is_file()
        and cfg_file.is_file()
        and cfg_file.read_text() == cfg_text
    )


def _run_seed(run_dir, text, out, runner, fresh, cpus_per_site, timeout, pretrained=None) -> None:
    """One seed's federated run in ``run_dir`` (its config saved as ``experiment.yaml``);
    ``pretrained``: (the seed's own run folder, the study), for a fine-tuning repeat that starts
    from that folder's completed pretraining."""
    if fresh and run_dir.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        if pretrained is not None:
            _reuse_pretraining(*pretrained, run_dir)
        cfg_file = run_dir / "experiment.yaml"
        cfg_file.write_text(text)
        runner(cfg_file, run_dir, False, cpus_per_site, timeout, out / "data")
    finally:  # a stopped or failed invocation cost wall time too; the resumed run continues it
        _add_wall_seconds(run_dir, time.monotonic() - t0)


def _add_wall_seconds(run_dir: Path, seconds: float) -> None:
    """Add one invocation's wall time to ``run_dir/wall.json`` (seconds, invocations); written
    atomically, since it is written while a stop signal is being handled."""
    from server.store import atomic_write_json  # noqa: PLC0415

    path = run_dir / "wall.json"
    wall = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "invocations": 0}
    wall = {"seconds": round(wall["seconds"] + seconds, 1), "invocations": wall["invocations"] + 1}
    atomic_write_json(path, wall)


def _wall_seconds(run_dir: Path) -> float:
    """The wall time of every invocation of one run (``wall.json``); a run folder without one
    (made by an older crossprobe) falls back to its finishing invocation's (``simulate.json``)."""
    for name in ("wall.json", "simulate.json"):
        if (path := run_dir / name).is_file():
            return float(json.loads(path.read_text()).get("seconds", 0.0))
    return 0.0


def write_study(cfg: ExperimentConfig, seeds: list[int], out: Path, walls: list[float]) -> None:
    """``study.json``, ``study.md`` and ``figures/`` from each seed's ``results.json``."""
    from server.repeats import mean_over_repeats
    from server.study import aggregate, render_markdown

    k = cfg.study.finetune_repeats
    runs = [
        mean_over_repeats(
            cfg, [json.loads((d / "results.json").read_text()) for d in repeat_dirs(out, s, k)]
        )
        for s in seeds
    ]
    study = aggregate(cfg, seeds, runs, walls)
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "study.md").write_text(render_markdown(study))
    try:
        from server.study_figures import study_figures  # noqa: PLC0415

        study_figures(study, runs, out / "figures")
    except ImportError:  # pragma: no cover - matplotlib missing: tables only
        pass


def run_experiment(
    name: str | Path,
    seeds: list[int] | None = None,
    run_root: Path = Path("runs/experiments"),
    fresh: bool = False,
    cpus_per_site: float = 0.0,
    timeout: float = 0.0,
    report_only: bool = False,
    runner: Callable[..., Any] | None = None,
    log: Callable[[str], None] = typer.echo,
) -> Path:
    """Run (or resume) every seed of a study, then write its tables. Returns the study folder.

    ``runner(config_path, run_dir, fresh, cpus_per_site, timeout, sites_root)`` runs one seed;
    default ``simulations.simulate.run_simulation`` (the real Flower simulation).

    Raises:
        ConfigError: unknown experiment or invalid config. FileNotFoundError: ``report_only`` and a
        seed has no results. ``SimulationError``: a seed's run failed (earlier seeds are kept).
    """
    cfg = load_experiment(resolve(name))
    seeds = list(seeds) if seeds else list(cfg.study.seeds)
    out = Path(run_root).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    if runner is None:
        from simulations.simulate import run_simulation as runner  # noqa: PLC0415
    with locked(out, f"crossprobe experiment {cfg.name}"), stop_signals_raise():
        walls = _run_seeds(cfg, seeds, out, runner, fresh, cpus_per_site, timeout, report_only, log)
        write_study(cfg, seeds, out, walls)
    log(f"[experiment {cfg.name}] study: {out / 'study.md'}")
    return out


def _run_seeds(cfg, seeds, out, runner, fresh, cpus_per_site, timeout, report_only, log):
    """Run (or reuse) each seed in turn, each of its fine-tuning repeats after the first on a copy
    of its pretrained encoders; returns each seed's wall seconds (all its repeats)."""
    walls: list[float] = []
    k = cfg.study.finetune_repeats
    for i, seed in enumerate(seeds, 1):
        dirs = repeat_dirs(out, seed, k)
        for r, run_dir in enumerate(dirs):
            text = dump_experiment(repeat_config(seed_config(cfg, seed), r))
            where = f"[experiment {cfg.name}] seed {seed} ({i}/{len(seeds)})"
            where += f" fine-tuning repeat {r + 1}/{k}" if k > 1 else ""
            if report_only or (not fresh and _done(run_dir, text)):
                if not (run_dir / "results.json").is_file():
                    raise FileNotFoundError(
                        f"{run_dir / 'results.json'}: seed {seed} has not been run"
                        + (f" (fine-tuning repeat {r})" if r else "")
                    )
                log(f"{where}: done earlier, reusing {run_dir}")
                continue
            log(f"{where}: running → {run_dir}")
            pretrained = (dirs[0], cfg) if r else None
            _run_seed(run_dir, text, out, runner, fresh, cpus_per_site, timeout, pretrained)
        walls.append(sum(_wall_seconds(d) for d in dirs))
        # from the seeds' recorded walls, so a seed resumed over several invocations counts whole
        left = len(seeds) - i
        eta = f"; ETA {sum(walls) / i * left / 60:.0f} min for {left} more seed(s)" if left else ""
        log(f"[experiment {cfg.name}] seed {seed} finished, {walls[-1] / 60:.1f} min of wall{eta}")
    return walls


def _reuse_pretraining(seed_dir: Path, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Start a fine-tuning repeat's run folder from the seed's completed pretraining phase."""
    from server.store import RunStore  # noqa: PLC0415
    from server.workflow import PRETRAIN, run_identity  # noqa: PLC0415

    identity = run_identity(cfg)
    RunStore(run_dir, identity).adopt(RunStore(seed_dir, identity), PRETRAIN)


def experiment_command(
    name: Annotated[
        str, typer.Argument(help="configs/experiments/NAME.yaml, or a path to a YAML.")
    ],
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds (default: the study's study.seeds).")
    ] = "",
    run_root: Annotated[Path, typer.Option(help="Studies go to RUN_ROOT/<name>/.")] = Path(
        "runs/experiments"
    ),
    fresh: Annotated[bool, typer.Option(help="Rerun every seed from scratch.")] = False,
    cpus_per_site: Annotated[
        float, typer.Option(help="CPUs per ClientApp (0 = all, one message at a time).")
    ] = 0.0,
    timeout: Annotated[
        float, typer.Option(help="Give up on a seed after this many seconds (0 = never).")
    ] = 0.0,
    report_only: Annotated[
        bool, typer.Option(help="Only rebuild the tables from finished seeds.")
    ] = False,
) -> None:
    """Run a study: one federated run per seed, then Tables 3–8 with per-video statistics."""
    from simulations.simulate import SimulationError

    try:
        parsed = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        raise typer.BadParameter(
            f"--seeds must be comma-separated integers (got {seeds!r})"
        ) from None
    try:
        run_experiment(name, parsed, run_root, fresh, cpus_per_site, timeout, report_only)
    except (SimulationError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
