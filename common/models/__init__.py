"""Models: TransUNet (R50-ViT-B/16 + CUP), its SimMIM and contrastive wrappers, the encoder
hand-off."""

from common.models.heads import ContrastiveModel, ProjectionHead
from common.models.simmim import SimMIMModel, apply_mask, simmim_mask
from common.models.transunet import (
    EncoderMismatchError,
    TransUNet,
    build_transunet,
    check_encoder_state,
    count_parameters,
    encoder_schema,
    encoder_state_dict,
    load_encoder,
)

__all__ = [
    "ContrastiveModel",
    "EncoderMismatchError",
    "ProjectionHead",
    "SimMIMModel",
    "TransUNet",
    "apply_mask",
    "build_transunet",
    "check_encoder_state",
    "count_parameters",
    "encoder_schema",
    "encoder_state_dict",
    "load_encoder",
    "simmim_mask",
]
