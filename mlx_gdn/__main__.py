"""`python -m mlx_gdn doctor [...]` runs `mlx_gdn.doctor` (the same as `python -m mlx_gdn.doctor`)."""

import sys

from .doctor import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] != ["doctor"]:
        sys.exit("usage: python -m mlx_gdn doctor [options]  (see python -m mlx_gdn.doctor --help; "
                 "the benchmark is python -m mlx_gdn.bench)")
    sys.exit(main(args[1:]))
