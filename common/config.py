"""The experiment schema: the one place every experiment key is named.

An experiment YAML (``configs/*.yaml``) is validated here once, at the edge, and the rest of the
code receives typed, frozen slices of it (``ModelConfig``, ``SimMIMConfig`` …), never raw dicts.
Defaults are the paper's choices as decided in ``docs/method.md``; the tiny/demo configs
override sizes and budgets only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common import arms
from common.errors import UserError

Role = Literal["source", "target"]
FusionMode = Literal["entropy", "margin", "mean"]


class ConfigError(UserError):
    """A user-caused configuration problem; the message names the file and the key."""


_NUMBER_TYPES = (int, float, int | None, float | None)


class _Frozen(BaseModel):
    """Every section: unknown keys refused, values frozen, numbers finite and never booleans
    (YAML's ``true`` would otherwise pass as 1, and ``.inf`` as a learning rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and field.annotation in _NUMBER_TYPES:
            raise ValueError(f"expected a number, got the boolean {v!r}")
        return v


class ModelConfig(_Frozen):
    """TransUNet size. Defaults are R50-ViT-B/16 at 224² (the paper).

    ``resnet_layers`` are the units per ResNet-v2 stage (paper 3, 4, 9); ``resnet_width`` scales the
    ResNet channels (64 → stem 64, stages 256/512/1024); ``embed_dim``/``depth``/``num_heads`` are
    the ViT; ``decoder_channels`` the four CUP blocks and ``decoder_hidden`` the 3×3 conv after the
    tokens (paper 512).
    """

    img_size: int = Field(224, ge=32)
    patch_stride: int = 16  # fixed by a 3-stage ResNet + 1×1 projection; documented, not tunable
    resnet_layers: tuple[int, int, int] = (3, 4, 9)
    resnet_width: int = Field(64, ge=8)
    embed_dim: int = Field(768, ge=16)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    decoder_hidden: int = Field(512, ge=1)
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 16)
    proj_hidden: int = Field(768, ge=1)
    proj_dim: int = Field(128, ge=1)
    checkpoint: str | None = None  # optional local R50+ViT-B/16 weights (.pth/.safetensors/.npz)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.patch_stride != 16:
            raise ValueError(f"model.patch_stride must be 16 (got {self.patch_stride})")
        if self.img_size % 16:
            raise ValueError(f"model.img_size must be a multiple of 16 (got {self.img_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if any(n < 1 for n in self.resnet_layers):
            raise ValueError(f"model.resnet_layers must all be >= 1 (got {self.resnet_layers})")
        return self

    @property
    def is_paper(self) -> bool:
        """True when this is exactly timm's ``vit_base_r50_s16_224`` encoder geometry."""
        return (
            self.resnet_layers == (3, 4, 9)
            and self.resnet_width == 64
            and self.embed_dim == 768
            and self.depth == 12
            and self.num_heads == 12
            and self.mlp_ratio == 4.0
        )


class OptimConfig(_Frozen):
    """One stage's optimiser and budget. ``max_steps`` (if set) caps the epochs."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    warmup_steps: int = Field(0, ge=0)
    # after the warm-up: constant, poly ((1 - t/T) ** 0.9, as the TransUNet authors' trainer) or
    # cosine; a decaying rate ends the stage on small steps, so its last weights move less from
    # seed to seed
    lr_schedule: Literal["constant", "poly", "cosine"] = "constant"
    val_every: int = Field(0, ge=0)  # steps between validations; 0 = once per epoch
    # 0: off. Else validation scores, and the stage keeps, an exponential moving average of the
    # weights (decay ramped up as (1 + t) / (10 + t) early on), not the last step's weights
    ema_decay: float = Field(0.0, ge=0, lt=1)


class SimMIMConfig(_Frozen):
    """Branch 1, SimMIM on TransUNet (docs/method.md, "Branch 1: SimMIM")."""

    mask_patch_size: int = Field(32, ge=1)
    mask_ratio: float = 0.6
    noise_ratio: float = Field(0.0, ge=0, le=1)  # authors' speckle on masked units; paper: none
    optim: OptimConfig = OptimConfig(
        optimizer="adamw", lr=5e-4, weight_decay=0.05, batch_size=128, epochs=1200
    )

    @field_validator("mask_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"simmim.mask_ratio must be in (0, 1) (got {v})")
        return v


class ContrastiveConfig(_Frozen):
    """Branch 2, MT-NXent (docs/method.md, "Branch 2: MT-NXent"). ``min_frame_gap`` 0 is SimCLR's
    NT-Xent."""

    temperature: float = 0.5
    min_frame_gap: int = 15
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = Field(0.4, ge=0)
    jitter_p: float = Field(0.8, ge=0, le=1)
    augment_both_views: bool = True
    simclr_arm: bool = False  # also pretrain + fine-tune a SimCLR (min_frame_gap 0) arm
    sampler: Literal["random", "video"] = "random"
    frames_per_video: int = Field(4, ge=2)  # for sampler: video
    # runtime.world_size > 1: negatives from the whole global batch (the paper's text), or from
    # each process's share only (the authors' published script)
    negatives: Literal["global", "per-device"] = "global"
    optim: OptimConfig = OptimConfig(
        optimizer="adam", lr=1e-5, weight_decay=0.05, batch_size=512, epochs=400
    )

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"contrastive.temperature must be > 0 (got {v})")
        return v

    @field_validator("min_frame_gap")
    @classmethod
    def _gap(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"contrastive.min_frame_gap must be >= 0 (got {v})")
        return v


class FinetuneConfig(_Frozen):
    """Supervised DiceBCE fine-tuning at the source site; best checkpoint by validation loss."""

    weight_decay_contrastive: float = Field(0.1, ge=0)  # the paper's contrastive-branch decay
    augment: bool = False  # strong appearance augmentation (the source-only baseline's option)
    # the encoder's learning rate is optim.lr times this when it starts pretrained (a pretraining
    # branch or model.checkpoint); below 1 keeps more of what pretraining learnt (docs/method.md)
    encoder_lr_scale: float = Field(1.0, gt=0, le=1)
    # which fine-tuning run of this seed: repeat r > 0 draws its initial weights, batch order and
    # augmentations from another seed (seed + REPEAT_SEED_STRIDE·r) on the same pretrained encoders,
    # so a study can score each arm as the mean of several fine-tuning runs (docs/results.md)
    repeat: int = Field(0, ge=0)
    optim: OptimConfig = OptimConfig(
        optimizer="sgd", lr=2e-4, momentum=0.99, weight_decay=0.05, batch_size=512, epochs=200
    )


REPEAT_SEED_STRIDE = 104_729  # a prime far above any seed a study names (variants use 1000)


def finetune_seed(seed: int, repeat: int) -> int:
    """The seed fine-tuning draws from: the experiment's own for repeat 0."""
    return seed + REPEAT_SEED_STRIDE * repeat


class FusionConfig(_Frozen):
    """Confidence-aware infusion head (docs/method.md, "Confidence-aware fusion")."""

    modes: tuple[FusionMode, ...] = ("entropy", "margin", "mean")
    default_mode: FusionMode = "entropy"
    normalize: Literal["image", "batch"] = "image"
    eps: float = Field(1e-6, gt=0)
    threshold: float = Field(0.5, gt=0, lt=1)


AdaptMethod = Literal["none", "self-training", "tent"]


class AdaptConfig(_Frozen):
    """The optional phase after fine-tuning (docs/method.md, "Adapting at the target"): each target
    site trains the fine-tuned pair on its own unlabeled train frames, with no label and no
    stopping rule that looks at one (a fixed budget), and keeps the result.

    self-training: pseudo-labels from an EMA teacher's fused prediction, each pixel weighted by the
    fusion's confidence, learnt by both students on a strongly augmented view.
    tent: entropy minimisation of each branch's prediction on the normalisation layers' affine
    parameters only (batch-norm statistics re-estimated on the target frames).
    """

    method: AdaptMethod = "none"
    ema: float = Field(0.99, ge=0, lt=1)  # self-training: the teacher's momentum per step
    min_confidence: float = Field(0.0, ge=0, lt=1)  # self-training: pixels below weigh nothing
    strong_view: bool = True  # self-training: the students see a strongly augmented view
    # self-training: the zero padding, and edge_px pixels into the frame from it, are background
    # with full weight — known from each frame's size, no label (docs/method.md)
    padding_prior: bool = True
    edge_px: int = Field(2, ge=0)
    health_frames: int = Field(64, ge=1)  # frames the label-free before/after signals are read on
    optim: OptimConfig = OptimConfig(
        optimizer="adamw", lr=1e-4, weight_decay=0.0, batch_size=16, epochs=50, max_steps=60
    )


# Half the boundary noise of the old difficulty-1 annotators: the paper's labels come from
# experienced sonographers, and the shift it studies is the device's and the operator's
DEFAULT_ANNOTATION_NOISE = 0.5


class SynthConfig(_Frozen):
    """How the simulator makes a site's synthetic data (simulations/phantom)."""

    preset: str = "source"  # phantom preset: source (lumify) | target (telemed) | more
    patients: int = Field(12, ge=1)
    videos_per_patient: int = Field(3, ge=1)
    frames_per_video: int = Field(40, ge=1)
    img_size: int | None = None  # rendered frame size; None = model.img_size
    # how hard the frames are to read: the operator's tilt, contact loss and off-plane frames and
    # how fast the bone echo fades at steep angles. None: the preset's (an expert at the source
    # 1.0, novices at the target 2.0, calibrated by simulations/phantom/calibrate.py)
    difficulty: float | None = Field(None, ge=0)
    # the annotator's boundary noise (per-video band thickness and depth offset, per-frame
    # wiggle); 1.0 is the old coupling at difficulty 1, 0 labels the exact geometry
    annotation_noise: float = Field(DEFAULT_ANNOTATION_NOISE, ge=0)
    seed: int = 0
    mask: Literal["band", "full"] = "band"  # label a band below the bone surface, or all below it
    band_mm: float = Field(2.0, gt=0)  # depth of the labeled band (mask: band)
    label_every: int = Field(8, ge=1)  # target sites: every n-th frame of a video is labeled
    target_train_labels: bool = (
        True  # target: sparse labels on train too (upper bound; SSL ignores)
    )
    val_fraction: float = Field(0.16, ge=0, lt=1)  # patient split; train gets the rest
    test_fraction: float = Field(0.16, ge=0, lt=1)


class SiteConfig(_Frozen):
    """One site of a simulated federation (partition-id indexes the ``sites`` list)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    role: Role
    data_dir: str | None = None  # existing canonical site folder; else made by ``synth``
    synth: SynthConfig | None = None

    @model_validator(mode="after")
    def _data(self) -> SiteConfig:
        if self.data_dir is None and self.synth is None:
            raise ValueError(f"site {self.name!r} needs either data_dir or synth")
        return self


class RuntimeConfig(_Frozen):
    """How the stages execute (not what they compute)."""

    device: str = "cpu"
    bf16: bool = False  # autocast bf16 (only where the device supports it)
    channels_last: bool = False
    num_workers: int = Field(0, ge=0)
    threads: int | None = None
    # processes that train one model at a site (one GPU each on CUDA; gloo between CPU processes);
    # every batch_size is the global batch and must divide by it (common/distributed.py)
    world_size: int = Field(1, ge=1)
    # the dtype float weights cross the network in: float16 halves the bytes (a tensor whose values
    # do not fit float16 stays float32); the sites train and keep float32 either way
    wire_dtype: Literal["float32", "float16"] = "float32"


ARM_NAME = r"^[a-z][a-z0-9_.-]*$"
VariantBranch = Literal[arms.VARIANT_BRANCHES]  # type: ignore[valid-type]  (names: common/arms.py)
VARIANT_SECTIONS = ("simmim", "contrastive", "finetune")  # what a variant may change (+ "seed")


class VariantConfig(_Frozen):
    """One extra arm of a study: a pretraining branch or the lower bound, run with a few settings
    changed, e.g. ``{name: tau0.1, branch: contrastive, set: {contrastive.temperature: 0.1}}``.

    ``set`` takes dotted keys under ``simmim.``, ``contrastive.``, ``finetune.`` or ``seed``
    (a second model of the same recipe). The model itself never changes, so every arm's weights
    share one schema and any two can be fused.
    """

    name: str = Field(pattern=ARM_NAME, max_length=40)
    branch: VariantBranch
    set: dict[str, float | int | bool | str] = Field(default_factory=dict)
    every_seed: bool = False  # a main-table row: run on every seed, not only study.variant_seeds

    @model_validator(mode="after")
    def _check(self) -> VariantConfig:
        if self.name in arms.BUILTIN_ARMS:
            raise ValueError(f"variant name {self.name!r} is a built-in arm {arms.BUILTIN_ARMS}")
        if self.name.endswith(arms.ADAPTED):
            # `<arm>-adapted` names the main pair's arms after the target's adapt phase.
            raise ValueError(
                f"variant name {self.name!r}: the suffix {arms.ADAPTED!r} is kept for adapted arms"
            )
        for key in self.set:
            head = key.split(".", 1)[0]
            if key != "seed" and (head not in VARIANT_SECTIONS or "." not in key):
                raise ValueError(
                    f"variant {self.name!r}: set.{key} may not change; a variant may set "
                    f"seed or keys under {', '.join(s + '.' for s in VARIANT_SECTIONS)}"
                )
        return self


class StudyConfig(_Frozen):
    """Extra arms, extra fused pairs and seeds for ``crossprobe experiment``."""

    variants: tuple[VariantConfig, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()  # extra fused pairs of arm names (Table 8)
    seeds: tuple[int, ...] = (0,)  # one federated run per seed (crossprobe experiment)
    variant_seeds: tuple[int, ...] | None = None  # seeds that also run the variants (None = all)
    # fine-tuning runs per seed on the seed's pretrained encoders (finetune.repeat 0…k−1); every
    # arm is scored as their mean, which divides the fine-tuning noise by about √k
    finetune_repeats: int = Field(1, ge=1)
    select_on_source_val: bool = True  # also score the fusions on source validation (Table 7)


class ExperimentConfig(_Frozen):
    """A whole experiment: model, three stages, fusion, sites, runtime (and an optional study)."""

    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(1, ge=1)  # federated rounds per phase (several sites of one role)
    model: ModelConfig = ModelConfig()
    simmim: SimMIMConfig = SimMIMConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    fusion: FusionConfig = FusionConfig()
    adapt: AdaptConfig = AdaptConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    sites: tuple[SiteConfig, ...] = ()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [s.name for s in self.sites]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"sites: duplicate site name(s) {sorted(dup)}")
        variants = [v.name for v in self.study.variants]
        dup = {n for n in variants if variants.count(n) > 1}
        if dup:
            raise ValueError(f"study.variants: duplicate name(s) {sorted(dup)}")
        built_in = arms.pretrain_branches(self.contrastive.simclr_arm)
        known = {*(arms.BRANCHES[b].arm for b in built_in), arms.LOWER, arms.UPPER, *variants}
        for a, b in self.study.pairs:
            for arm in (a, b):
                if arm not in known:
                    raise ValueError(
                        f"study.pairs: {arm!r} is not an arm of this experiment {sorted(known)}"
                    )
            if a == b:
                raise ValueError(f"study.pairs: ({a}, {b}) fuses an arm with itself")
        for v in self.study.variants:
            variant_config(self, v)  # every override must make a valid experiment
        world = self.runtime.world_size
        for section in ("simmim", "contrastive", "finetune"):
            bs = getattr(self, section).optim.batch_size
            if bs % world:  # each process takes an equal share of every batch
                raise ValueError(
                    f"{section}.optim.batch_size ({bs}) must divide by runtime.world_size ({world})"
                )
        if self.model.img_size % self.simmim.mask_patch_size:
            raise ValueError(
                f"simmim.mask_patch_size ({self.simmim.mask_patch_size}) must divide "
                f"model.img_size ({self.model.img_size})"
            )
        return self

    @property
    def simmim_masked_units(self) -> int:
        units = (self.model.img_size // self.simmim.mask_patch_size) ** 2
        return math.ceil(self.simmim.mask_ratio * units)


def variant_config(cfg: ExperimentConfig, variant: VariantConfig) -> ExperimentConfig:
    """The experiment a variant arm runs with: ``cfg`` with ``variant.set`` applied, no study.

    Raises:
        ValueError: a key of ``variant.set`` does not exist or its value is invalid (named).
    """
    data = cfg.model_dump(mode="python", exclude={"study"})
    for dotted, value in variant.set.items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(
                f"variant {variant.name!r}: set.{dotted} is not a key of the experiment"
            )
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(
            f"variant {variant.name!r}: invalid settings\n{_format_errors(err)}"
        ) from None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_experiment(data: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a mapping as an experiment.

    Raises:
        ConfigError: naming ``source`` and each bad key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment must be a mapping at the top level")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid experiment config\n{_format_errors(err)}") from None


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load and validate ``path`` (YAML). ``overrides`` uses dotted keys, e.g. {"seed": 1}.

    Raises:
        ConfigError: the file is missing, not YAML, or a key is unknown or out of range.
    """
    p = Path(path)
    data = _read_with_base(p, ())
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_experiment(data, str(p))


def _read_with_base(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is read first and
    this file's keys are merged over it (mappings merge key by key; lists and values replace)."""
    if not p.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{p}: experiment config not found{where}")
    if p.resolve() in chain:
        raise ConfigError(
            f"{p}: 'base' chain loops: {' -> '.join(map(str, chain + (p.resolve(),)))}"
        )
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}): is it a YAML file?") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: an experiment must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base: must be a path to another experiment YAML")
    return _merge(_read_with_base(p.parent / base, chain + (p.resolve(),)), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[leaf] = value


def dump_experiment(cfg: ExperimentConfig) -> str:
    """The config as YAML (what a run records next to its results)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
