"""The names of what a study trains and compares, defined once.

- A **branch** is how an arm's encoder comes to be before fine-tuning: one of the target site's
  pretraining branches (SimMIM, MT-NXent, SimCLR), or none (the lower bound's recipe).
- An **arm** is one fine-tuned TransUNet: the built-in ones (``simmim``, ``mtnxent``, ``simclr``,
  ``lower``, ``upper``) and a study's variants (``study.variants[].name``).
- A **method** is what the report scores: an arm, or a fused pair of arms in one fusion mode.
  ``fusion-<mode>`` is the main pair (SimMIM + MT-NXent: the paper's method, "ours");
  ``fusion-<mode>+adapt`` the main pair after a target site adapted it to its own unlabeled
  frames (arms ``simmim-adapted``, ``mtnxent-adapted``: "ours+adapt");
  ``fusion-<mode>[a+b]`` any other pair (paper Table 8).

Every module that names a branch, an arm or a method imports it from here
(docs/architecture.md, "Names").
"""

from __future__ import annotations

from dataclasses import dataclass

SIMMIM = "simmim"
CONTRASTIVE = "contrastive"  # MT-NXent with the experiment's contrastive.min_frame_gap
SIMCLR = "simclr"  # the contrastive branch with min_frame_gap = 0
MTNXENT = "mtnxent"  # the arm fine-tuned from the contrastive branch
LOWER = "lower"  # source-trained, no target pretraining
UPPER = "upper"  # trained on the target's own sparse labels


@dataclass(frozen=True)
class Branch:
    """How an arm's encoder is made before fine-tuning."""

    name: str
    arm: str  # the built-in arm fine-tuned from this branch
    pretrains: bool  # False: the lower bound's recipe (fine-tuned from scratch)
    contrastive: bool  # fine-tuned with finetune.weight_decay_contrastive (the paper's 0.1)


BRANCHES: dict[str, Branch] = {
    b.name: b
    for b in (
        Branch(SIMMIM, SIMMIM, pretrains=True, contrastive=False),
        Branch(CONTRASTIVE, MTNXENT, pretrains=True, contrastive=True),
        Branch(SIMCLR, SIMCLR, pretrains=True, contrastive=True),
        Branch(LOWER, LOWER, pretrains=False, contrastive=False),
    )
}
PRETRAIN_BRANCHES = tuple(n for n, b in BRANCHES.items() if b.pretrains)
VARIANT_BRANCHES = tuple(BRANCHES)  # what a study variant may follow
BUILTIN_ARMS = (*(b.arm for b in BRANCHES.values()), UPPER)
MAIN_PAIR = (SIMMIM, MTNXENT)  # "ours": the heterogeneous pair the paper fuses
ADAPTED = "-adapted"  # the main pair's arms after the target's adapt phase (they stay there)
ADAPTED_PAIR = (f"{SIMMIM}{ADAPTED}", f"{MTNXENT}{ADAPTED}")


def branch(name: str) -> Branch:
    """The branch called ``name``.

    Raises:
        ValueError: no such branch (the message lists the known ones).
    """
    if name not in BRANCHES:
        raise ValueError(f"unknown branch {name!r}; expected one of {tuple(BRANCHES)}")
    return BRANCHES[name]


def pretrain_branches(simclr_arm: bool) -> list[str]:
    """The pretraining branches every run has: SimMIM, MT-NXent, and SimCLR when asked for."""
    return [SIMMIM, CONTRASTIVE] + ([SIMCLR] if simclr_arm else [])


@dataclass(frozen=True)
class Method:
    """One row of the report: a single arm, or a pair of arms fused in one mode."""

    arm: str = ""
    mode: str = ""
    pair: tuple[str, str] | None = None

    @property
    def is_fusion(self) -> bool:
        return self.pair is not None

    @property
    def name(self) -> str:
        if self.pair is None:
            return self.arm
        if self.pair == MAIN_PAIR:
            return f"fusion-{self.mode}"
        if self.pair == ADAPTED_PAIR:
            return f"fusion-{self.mode}+adapt"
        return f"fusion-{self.mode}[{self.pair[0]}+{self.pair[1]}]"


def fusion_name(mode: str, pair: tuple[str, str]) -> str:
    """``fusion-<mode>`` for the main pair, ``fusion-<mode>[a+b]`` for any other."""
    return Method(mode=mode, pair=(pair[0], pair[1])).name


def ours(default_mode: str) -> str:
    """The paper's method: the main pair fused in the experiment's default mode."""
    return fusion_name(default_mode, MAIN_PAIR)


def ours_adapted(default_mode: str) -> str:
    """The paper's method after the target's adapt phase, in the experiment's default mode."""
    return fusion_name(default_mode, ADAPTED_PAIR)


def parse_method(name: str) -> Method:
    """The method a report row names (the inverse of :attr:`Method.name`).

    Raises:
        ValueError: ``fusion-…`` that is not ``fusion-<mode>``, ``fusion-<mode>+adapt`` or
            ``fusion-<mode>[a+b]``.
    """
    if not name.startswith("fusion-"):
        return Method(arm=name)
    rest = name.removeprefix("fusion-")
    if rest.endswith("+adapt") and "[" not in rest:
        return Method(mode=rest.removesuffix("+adapt"), pair=ADAPTED_PAIR)
    if "[" not in rest:
        return Method(mode=rest, pair=MAIN_PAIR)
    mode, _, inner = rest.partition("[")
    a, plus, b = inner.removesuffix("]").partition("+")
    if not (mode and a and b and plus and inner.endswith("]")):
        raise ValueError(f"{name!r} is not fusion-<mode> or fusion-<mode>[a+b]")
    return Method(mode=mode, pair=(a, b))
