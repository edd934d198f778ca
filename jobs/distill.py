"""Entry script for `ray job submit`: the same arguments as `ega-ray distill`.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/distill.py --config configs/smoke.yaml --output runs/smoke
"""

import sys

from ega_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
