"""The `dynamixer` commands, one module per command: each defines ``add_arguments(parser)`` and
``run(args) -> int`` (registered in `dynamixer.cli.COMMANDS`). Commands import the library;
the library never imports a command."""
