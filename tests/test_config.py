"""Experiment configs: the shipped YAMLs validate; user mistakes get one clear message."""

from pathlib import Path

import pytest
import yaml

from common.config import (
    ConfigError,
    ExperimentConfig,
    dump_experiment,
    load_experiment,
    parse_experiment,
    variant_config,
)


@pytest.mark.parametrize("name", ["tiny", "demo", "paper", "long"])
def test_shipped_configs_load(name):
    cfg = load_experiment(f"configs/{name}.yaml")
    assert cfg.name == name
    assert {s.role for s in cfg.sites} == {"source", "target"}
    # round trip through YAML is lossless
    assert parse_experiment(yaml.safe_load(dump_experiment(cfg))) == cfg


def test_paper_config_holds_the_papers_hyperparameters():
    cfg = load_experiment("configs/paper.yaml")
    assert cfg.model.is_paper and cfg.model.img_size == 224
    assert (cfg.simmim.mask_patch_size, cfg.simmim.mask_ratio, cfg.simmim.noise_ratio) == (
        32,
        0.6,
        0.0,
    )
    assert (cfg.simmim.optim.lr, cfg.simmim.optim.batch_size, cfg.simmim.optim.epochs) == (
        5e-4,
        128,
        1200,
    )
    assert (cfg.contrastive.temperature, cfg.contrastive.min_frame_gap) == (0.5, 15)
    assert (
        cfg.contrastive.optim.optimizer,
        cfg.contrastive.optim.lr,
        cfg.contrastive.optim.epochs,
    ) == ("adam", 1e-5, 400)
    f = cfg.finetune.optim
    assert (f.optimizer, f.lr, f.momentum, f.weight_decay, f.epochs) == (
        "sgd",
        2e-4,
        0.99,
        0.05,
        200,
    )
    assert cfg.finetune.weight_decay_contrastive == 0.1
    assert cfg.simmim_masked_units == 30


def _write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key",
    [
        ("contrastive:\n  temprature: 0.5\n", "contrastive.temprature"),
        ("contrastive:\n  temperature: -0.1\n", "contrastive.temperature"),
        ("simmim:\n  mask_ratio: 1.5\n", "simmim.mask_ratio"),
        ("simmim:\n  mask_ratio: 0\n", "simmim.mask_ratio"),
        ("contrastive:\n  min_frame_gap: -2\n", "contrastive.min_frame_gap"),
        ("model:\n  embed_dim: 100\n  num_heads: 3\n", "model"),
        ("fusion:\n  default_mode: max\n", "fusion.default_mode"),
        ("simmim:\n  optim: {lr: .inf}\n", "simmim.optim.lr"),
        ("finetune:\n  optim: {lr: .nan}\n", "finetune.optim.lr"),
        ("rounds: true\n", "rounds"),
        ("seed: false\n", "seed"),
        ("fusion:\n  eps: true\n", "fusion.eps"),
        ("runtime:\n  threads: yes\n", "runtime.threads"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert str(p) in msg and key in msg
    assert "Traceback" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "model: [unclosed\n"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin1}: not UTF-8"):
        load_experiment(latin1)


def test_unknown_synth_preset_names_the_site_and_key(tmp_path):
    from simulations.sites import plan_site

    cfg = load_experiment("configs/tiny.yaml")
    site = cfg.sites[1].model_copy(
        update={"synth": cfg.sites[1].synth.model_copy(update={"preset": "butterfly-iq"})}
    )
    with pytest.raises(ConfigError, match="site 'telemed': synth.preset: unknown synth preset"):
        plan_site(site, cfg.model.img_size)


def test_config_is_frozen_and_overrides_apply():
    cfg = load_experiment(
        "configs/tiny.yaml", overrides={"contrastive.min_frame_gap": 0, "seed": 3}
    )
    assert cfg.contrastive.min_frame_gap == 0 and cfg.seed == 3
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        cfg.seed = 4  # type: ignore[misc]
    assert ExperimentConfig().model.is_paper


def test_duplicate_site_names_refused():
    data = {
        "sites": [
            {"name": "a", "role": "source", "synth": {}},
            {"name": "a", "role": "target", "synth": {}},
        ]
    }
    with pytest.raises(ConfigError, match="duplicate"):
        parse_experiment(data, "x.yaml")


def test_base_file_is_merged_under_the_experiment(tmp_path):
    (tmp_path / "parent.yaml").write_text(Path("configs/tiny.yaml").read_text())
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nname: child\ncontrastive: {temperature: 0.1}\n")
    cfg = load_experiment(child)
    tiny = load_experiment("configs/tiny.yaml")
    assert cfg.name == "child" and cfg.contrastive.temperature == 0.1
    # mappings merge key by key: the rest of contrastive and every other section come from the base
    assert cfg.contrastive.min_frame_gap == tiny.contrastive.min_frame_gap
    assert cfg.model == tiny.model and cfg.sites == tiny.sites


def test_base_errors_name_the_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="'base' chain loops"):
        load_experiment(a)
    a.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: experiment config not found \(base of"):
        load_experiment(a)


@pytest.mark.parametrize(
    "study,match",
    [
        (
            {
                "variants": [
                    {"name": "x", "branch": "contrastive", "set": {"contrastive.temprature": 1}}
                ]
            },
            r"set.contrastive.temprature is not a key",
        ),
        (
            {"variants": [{"name": "x", "branch": "simmim", "set": {"model.depth": 1}}]},
            r"set.model.depth may not change",
        ),
        (
            {
                "variants": [
                    {"name": "x", "branch": "contrastive", "set": {"contrastive.temperature": -1}}
                ]
            },
            r"variant 'x': invalid settings",
        ),
        ({"variants": [{"name": "simmim", "branch": "simmim"}]}, "is a built-in arm"),
        (
            {"variants": [{"name": "simmim-adapted", "branch": "simmim"}]},
            "suffix '-adapted' is kept for adapted arms",
        ),
        ({"pairs": [["simmim", "nope"]]}, r"study.pairs: 'nope' is not an arm"),
        (
            {"variants": [{"name": "a", "branch": "lower"}, {"name": "a", "branch": "lower"}]},
            "duplicate name",
        ),
    ],
)
def test_bad_study_names_the_key(tmp_path, study, match):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({"base": str(Path("configs/tiny.yaml").resolve()), "study": study})
    )
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_variant_config_applies_only_its_settings():
    cfg = load_experiment("configs/experiments/tables.yaml")
    tau = next(v for v in cfg.study.variants if v.name == "tau0.1")
    vc = variant_config(cfg, tau)
    assert vc.contrastive.temperature == 0.1 and vc.study.variants == ()
    assert vc.model_copy(update={"contrastive": cfg.contrastive, "study": cfg.study}) == cfg
