"""The `dynamixer` command line: one sub-command per module.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; add a line to
COMMANDS to register a new one.
"""
import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    'info': ('dynamixer.info', 'build every model, check it and print the model table'),
    'train': ('dynamixer.train', 'train a model (default: dynamixer_nano on the embedded digits)'),
    'validate': ('dynamixer.validate', 'top-1/top-5 accuracy and loss of a checkpoint on a data set'),
    'predict': ('dynamixer.predict', 'classify image files with a checkpoint'),
    'export': ('dynamixer.export', 'export a checkpoint to ONNX, TorchScript or safetensors, with its preprocessing'),
    'push-to-hub': ('dynamixer.hub', 'write a Hugging Face Hub folder (config, safetensors, model card) or push it'),
    'ablate': ('dynamixer.ablate', 'train a grid of model variants (dynamic vs static mixing, d, S, '
                                   'block) and tabulate top-1 over seeds'),
    'dense': ('dynamixer.dense.command', 'train and evaluate detectors (torchvision) and a segmenter on '
                                         'the digits detection task, DynaMixer vs timm backbones'),
    'show-mixing': ('dynamixer.show_mixing', 'draw the mixing matrices a trained model generates '
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
