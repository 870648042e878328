"""`dynamixer push-to-hub`: a checkpoint as a Hugging Face Hub model (safetensors, config, model card).

Everything goes through timm's own Hub functions, so the result loads like any timm model once
``dynamixer`` is imported (which registers the architectures)::

    import timm, dynamixer
    model = timm.create_model('hf-hub:USER/REPO', pretrained=True)     # from the Hub
    model = timm.create_model('local-dir:/path/to/folder', pretrained=True)  # from a folder

The folder holds ``config.json`` (architecture, the arguments that rebuild it, preprocessing,
class names), ``model.safetensors`` (weights only, no pickle) and ``README.md``, a model card with
the architecture, parameter count, multiply-adds, training recipe and measured accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from timm.data import ImageNetInfo
from timm.models import push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme

from ..checkpoint import load_model
from ..errors import DynaMixerError, require
from ..files import atomic_write_text, check_output_folder, read_checkpoint
from ..measure import count_macs
from ..model import MODEL_ARGS

PathLike = Union[str, os.PathLike]

__all__ = ['model_card', 'hub_model_config', 'save_hub_folder', 'push_to_hub', 'count_macs', 'HubError']

CITATION = """@inproceedings{wang2022dynamixer,
  title={DynaMixer: A Vision MLP Architecture with Dynamic Mixing},
  author={Wang, Ziyu and Jiang, Wenhao and Zhu, Yiming and Yuan, Li and Song, Yibing and Liu, Wei},
  booktitle={International Conference on Machine Learning},
  year={2022}
}"""


# training-config entries about the machine or the run folder, not the recipe
_NOT_RECIPE = {
    'model', 'output', 'device', 'threads', 'workers', 'progress', 'tensorboard', 'save_safetensors',
    'save_rank_weights', 'dataset_download', 'bad_images', 'resume', 'print_config', 'config',
}


def _flatten(d: Dict[str, Any], prefix: str = '') -> Iterator[Tuple[str, Any]]:
    for k, v in d.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            yield from _flatten(v, key + '.')
        else:
            yield key, v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:.6g}'
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v)) if len(v) <= 16 else f'[{len(v)} items]'
    return str(v)


def _find(config: Dict[str, Any], *keys: str) -> Optional[Any]:
    flat = dict(_flatten(config))
    for k in keys:
        for fk, v in flat.items():
            if (fk == k or fk.endswith('.' + k)) and v not in (None, ''):
                return v
    return None


def hub_model_config(model: torch.nn.Module, info: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_config, model_args) for timm's save_for_hf / push_to_hf_hub.

    model_config carries the class names; model_args every argument the checkpoint's model was
    built with (e.g. img_size, mixing='static'), so the Hub copy rebuilds the same architecture.
    """
    model_config: Dict[str, Any] = {}
    names = info.get('class_names')
    if names is not None:
        model_config['label_names'] = list(names)
    elif model.num_classes == 1000:
        imagenet = ImageNetInfo('imagenet-1k')
        model_config['label_names'] = list(imagenet.label_names())
        model_config['label_descriptions'] = imagenet.label_descriptions(as_dict=True)
    model_args = {}
    for k, v in ((info.get('config') or {}).get('model_kwargs') or {}).items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue  # e.g. a layer class: not something a Hub config can carry
        model_args[k] = v
    model_args['num_classes'] = model.num_classes
    return model_config, model_args


def model_card(model: torch.nn.Module, info: Dict[str, Any], repo_id: Optional[str] = None) -> Dict[str, Any]:
    """A timm model-card dict (rendered by timm's generate_readme) for a loaded checkpoint."""
    name = info['model']
    config = info.get('config') or {}
    metrics = info.get('metrics') or {}
    arch = dict(MODEL_ARGS.get(name, {}))
    arch.update({k: v for k, v in (config.get('model_kwargs') or {}).items()
                 if k in ('mixing', 'reweight', 'depths', 'embed_dims', 'num_segments', 'reduced_dim')})
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model)
    timm_model: Any = model  # timm keeps the config in plain attributes
    h, w = timm_model.img_size

    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': {
            'variant': name,
            'depths': _fmt(arch.get('depths')),
            'embed_dims': _fmt(arch.get('embed_dims')),
            'downsamples': _fmt(arch.get('downsamples')),
            'num_segments': _fmt(arch.get('num_segments')),
            'reduced_dim': arch.get('reduced_dim'),
            'patch_size': model.patch_size,
            'token mixing': arch.get('mixing', 'dynamic') + (
                ', channel re-weighting' if arch.get('reweight', True) else ', plain sum'),
        },
        'Model Stats': {
            'Params (M)': f'{params / 1e6:.2f} ({params:,})',
            'GMACs': f'{macs / 1e9:.3f}',
            'Image size': f'{h} x {w}',
            'Classes': model.num_classes,
        },
    }
    dataset = _find(config, 'dataset', 'data_name')
    if dataset:
        details['Dataset'] = str(dataset)
    # accuracy and loss only (`dynamixer train` also records lr, speed and a per-epoch history)
    metrics = {k: v for k, v in _flatten(metrics)
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and any(t in k.lower() for t in ('top1', 'top5', 'acc', 'loss'))}
    if metrics:
        details['Measured accuracy'] = {k: _fmt(v) for k, v in metrics.items()}
    else:
        details['Measured accuracy'] = 'not recorded in the checkpoint'
    recipe = {k: _fmt(v) for k, v in _flatten(config)
              if v is not None and not k.startswith('model_kwargs.') and k not in _NOT_RECIPE}
    if 'epoch' in info:
        recipe['epochs completed'] = info['epoch']
    details['Training recipe'] = recipe or 'not recorded in the checkpoint'
    details['Papers'] = {'DynaMixer: A Vision MLP Architecture with Dynamic Mixing': 'https://arxiv.org/abs/2201.12083'}

    source = f"'hf-hub:{repo_id}'" if repo_id else "'local-dir:/path/to/this/folder'"
    usage = (
        '```python\n'
        'import timm\n'
        'import dynamixer  # registers the DynaMixer architectures with timm\n\n'
        f'model = timm.create_model({source}, pretrained=True).eval()\n'
        'cfg = timm.data.resolve_data_config({}, model=model)\n'
        'transform = timm.data.create_transform(**cfg)\n'
        '# probs = model(transform(img).unsqueeze(0)).softmax(-1)\n'
        '```\n')
    return dict(
        description=(f'A DynaMixer ({name}) image classifier (Wang et al., ICML 2022), trained and '
                     f'exported with the `dynamixer` library.'),
        details=details,
        usage=usage,
        citation=CITATION,
        tags=['image-classification', 'timm', 'dynamixer'],
        license=timm_model.pretrained_cfg.get('license', 'apache-2.0'),
    )


def _load(checkpoint: PathLike) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    model, info = load_model(checkpoint)
    raw = read_checkpoint(checkpoint)
    if isinstance(raw.get('metrics'), dict):
        info['metrics'] = raw['metrics']
    if isinstance(raw.get('epoch'), int):
        info['epoch'] = raw['epoch']
    return model, info


def save_hub_folder(
        checkpoint: PathLike,
        directory: PathLike,
        repo_id: Optional[str] = None,
) -> Path:
    """Write the folder push_to_hub would upload: config.json, model.safetensors, README.md."""
    model, info = _load(checkpoint)
    directory = Path(directory)
    model_config, model_args = hub_model_config(model, info)
    save_for_hf(model, str(directory), model_config=model_config, model_args=model_args, safe_serialization=True)
    card = model_card(model, info, repo_id)
    readme = generate_readme(card, (repo_id or info['model']).split('/')[-1])
    atomic_write_text(readme, directory / 'README.md')
    return directory


def push_to_hub(
        checkpoint: PathLike,
        repo_id: str,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add DynaMixer model',
) -> Any:
    """Upload a checkpoint to the Hub with timm's push_to_hf_hub (safetensors only, with model card)."""
    require('huggingface_hub', 'hub', 'uploading to the Hugging Face Hub')
    model, info = _load(checkpoint)
    model_config, model_args = hub_model_config(model, info)
    return push_to_hf_hub(
        model, repo_id, commit_message=commit_message, token=token, private=private,
        model_config=model_config, model_args=model_args, model_card=model_card(model, info, repo_id),
        safe_serialization=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='checkpoint to publish')
    parser.add_argument('repo_id', help='Hub repository, e.g. USER/dynamixer_s-imagenet')
    parser.add_argument('--local-dir', default=None,
                        help='write the folder here instead of uploading (no network needed)')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--token', default=None, help='Hub token (default: the logged-in one)')


class HubError(DynaMixerError, OSError):
    """The Hub refused the upload or could not be reached (credentials, network, repository name)."""


def run(args: argparse.Namespace) -> int:
    require('huggingface_hub', 'hub', 'dynamixer push-to-hub')
    if args.local_dir:
        check_output_folder(args.local_dir, 'Hub folder (--local-dir)')
        out = save_hub_folder(args.checkpoint, args.local_dir, args.repo_id)
        files = ', '.join(sorted(p.name for p in out.iterdir()))
        print(f'wrote {out}: {files}')
        print(f"load it with timm.create_model('local-dir:{out}', pretrained=True) after `import dynamixer`, "
              f'or upload the folder to {args.repo_id}')
        return 0
    try:
        result = push_to_hub(args.checkpoint, args.repo_id, private=args.private, token=args.token)
    except DynaMixerError:
        raise
    except OSError as e:  # huggingface_hub's HTTP and token errors are OSErrors
        raise HubError(f'could not push to https://huggingface.co/{args.repo_id}: {e}. Log in with '
                       '`hf auth login` (or pass --token), check the network, or write the folder with '
                       '--local-dir and upload it later.') from None
    print(f'pushed {args.checkpoint} to https://huggingface.co/{args.repo_id} ({result})')
    return 0
