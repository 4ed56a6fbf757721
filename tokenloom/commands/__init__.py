"""One module per top-level CLI command; each exposes ``register(subparsers)``.

A command's handler takes the parsed ``argparse.Namespace`` and returns an exit code. Bad user
input raises ``tokenloom.common.errors.UsageError`` (one line naming the field); the CLI prints it on
stderr with exit code 2. Any other exception, a plain ``ValueError`` included, is a bug: exit 1
with the traceback.
"""
