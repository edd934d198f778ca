"""Entry script for `ray job submit`: the same arguments as `ega-ray benchmark`."""

import sys

from ega_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
