"""dynamixer: the DynaMixer vision architecture (Wang et al., ICML 2022) for PyTorch and timm.

Importing the package registers ``dynamixer_s``, ``dynamixer_m``, ``dynamixer_l`` and
``dynamixer_nano`` with timm, so ``timm.create_model('dynamixer_s')`` works.
"""
from typing import List

from .checkpoint import load_model
from .dense import pyramid_backbone
from .errors import DynaMixerError
from .files import CheckpointError, read_checkpoint, validate_checkpoint_file
from .layout import unwrap_state_dict
from .model import (
    MODEL_ARGS,
    DynaMixer,
    DynaMixerBlock,
    DynaMixerOp,
    DynaMixerStage,
    MixerLayer,
    checkpoint_filter_fn,
    token_grids,
)
from .ops import cpu_kernels_mode, explain_paths, fast_path_enabled, set_cpu_kernels, set_fast_path
from .resample import resample_state_dict

__version__ = '0.1.0'


def list_models() -> List[str]:
    """Names of the DynaMixer models registered with timm."""
    return list(MODEL_ARGS)
