"""The `dynamixer` command line: one sub-command per module, and the one error policy.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; add a line to
COMMANDS to register a new one.

The error policy lives here and nowhere else; commands raise, they do not print and exit:

- a bad flag value: argparse refuses it (numeric flags use `argtypes.Bounded`), exit code 2;
- a `DynaMixerError` (the user's mistake: a damaged checkpoint, a data folder that cannot be used,
  an output path that cannot be written, a missing optional dependency, ...): ``error: <message>``
  on stderr, exit code 2, no traceback;
- Ctrl-C: exit code 130 (training first names the checkpoint to resume from);
- any other exception is a bug: it propagates with its full traceback.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from .errors import DynaMixerError

# name -> (module, one-line help)
COMMANDS = {
    'info': ('dynamixer.commands.info', 'build every model, check it and print the model table'),
    'train': ('dynamixer.commands.train', 'train a model (default: dynamixer_nano on the embedded digits)'),
    'validate': ('dynamixer.commands.validate', 'top-1/top-5 accuracy and loss of a checkpoint on a data set'),
    'predict': ('dynamixer.commands.predict', 'classify image files with a checkpoint'),
    'export': ('dynamixer.commands.export',
               'export a checkpoint to ONNX, TorchScript or safetensors, with its preprocessing'),
    'push-to-hub': ('dynamixer.commands.hub',
                    'write a Hugging Face Hub folder (config, safetensors, model card) or push it'),
    'ablate': ('dynamixer.commands.ablate', 'train a grid of model variants (dynamic vs static mixing, d, S, '
                                   'block) and tabulate top-1 over seeds'),
    'benchmark': ('dynamixer.commands.benchmark', 'throughput and latency of models (this library\'s and timm\'s) per '
                                         'runtime, precision and batch size'),
    'dense': ('dynamixer.commands.dense', 'train and evaluate detectors (torchvision) and a segmenter on '
                                         'the digits detection task, DynaMixer vs timm backbones'),
    'detect': ('dynamixer.commands.detect', 'object detection / instance segmentation on COCO-format data: '
                                            'train, validate, predict, make-digits'),
    'segment': ('dynamixer.commands.segment', 'semantic segmentation on images + class-index masks: '
                                              'train, validate, predict'),
    'show-mixing': ('dynamixer.commands.show_mixing', 'draw the mixing matrices a trained model generates '
                                             'for given images'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='dynamixer', description='DynaMixer vision models: train, evaluate, predict, export.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit code (0 ok, 1 a result that failed, 2 a user error, 130
    interrupted). Argument errors exit through argparse (SystemExit with code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DynaMixerError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say how to continue (train: the checkpoint)
        print('\ninterrupted' + (f'; {e}' if str(e) else ''), file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
