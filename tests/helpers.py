"""Shared test helpers. Model side (random weights, nano factories, the authors' key names via
`dynamixer.layout`) first; command-side helpers go below their own heading."""
from typing import Dict

import timm
import torch
import torch.nn as nn

from dynamixer.layout import ours_to_authors
from dynamixer.model import DynaMixerBlock, DynaMixerOp, MixerLayer

# ------------------------------------------------------------------------ model side


def randomize_(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Weights far from init, so that mixing matrices are peaked and every branch matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def nano(**kwargs) -> nn.Module:
    """dynamixer_nano at its init."""
    return timm.create_model('dynamixer_nano', **kwargs)


def random_nano(**kwargs) -> nn.Module:
    """A float64 dynamixer_nano with 5 classes and seeded random weights (std 0.1)."""
    torch.manual_seed(0)
    return randomize_(timm.create_model('dynamixer_nano', num_classes=5, **kwargs).double(), std=0.1)


def to_authors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This project's keys -> the authors' (the library's one converter, `layout.ours_to_authors`)."""
    return ours_to_authors(state_dict)


# where a module sits in a network, in both layouts: its keys are converted in that context
_CONTEXT = {
    DynaMixerOp: ('stages.0.blocks.0.token_mixer.mix_h.', 'network.0.0.attn.mix_h.'),
    DynaMixerBlock: ('stages.0.blocks.0.token_mixer.', 'network.0.0.attn.'),
    MixerLayer: ('stages.0.blocks.0.', 'network.0.0.'),
}


def authors_names(module: nn.Module, prefix: str, keep_vars: bool = False) -> Dict[str, torch.Tensor]:
    """A module's weights under the authors' names with `prefix`, as tests/reference.py reads them
    (an op's 'reduce' -> '{prefix}.compress', ...). keep_vars=True gives the live parameters."""
    ours, theirs = _CONTEXT[type(module)]
    converted = to_authors({ours + k: v for k, v in module.state_dict(keep_vars=keep_vars).items()})
    return {f'{prefix}.{k[len(theirs):]}': v for k, v in converted.items()}


def grads_close(params_a, params_b, rtol: float = 1e-9) -> None:
    for a, b in zip(params_a, params_b):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=rtol * b.grad.abs().max().item())

# ------------------------------------------------------------------------ command side
