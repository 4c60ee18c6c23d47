"""Entry point of `python -m mlx_gdn.bench`."""

from .cli import main

main()
