"""Entry script for `ray job submit`: the same arguments as `ega-ray export` (runs on the job's driver node)."""

import sys

from ega_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
