"""`python -m protege ...` is the `protege` command (torchrun launches workers this way)."""

from .cli import main

main()
