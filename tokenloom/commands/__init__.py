"""One module per top-level CLI command; each exposes ``register(subparsers)``.

A command's handler takes the parsed ``argparse.Namespace`` and returns an exit code. Bad user
input raises ``ValueError`` (or ``tokenloom.cli.UsageError``); the CLI turns it into a one-line
message on stderr and exit code 2.
"""
