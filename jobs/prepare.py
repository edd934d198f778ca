"""Entry script for `ray job submit`: the same arguments as `ega-ray prepare` (converts a dataset that is
on the node running the job, or downloads it there with --download, into Parquet at --out)."""

import sys

from ega_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
