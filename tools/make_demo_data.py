"""Write the demo slide: a pyramidal TIFF (0.5 um/px) with three drawn tissue classes in known bands."""
from __future__ import annotations

import argparse
import json

from dfl_tf.demo import make_demo_data

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out/data")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=3072)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = make_demo_data(args.out, args.width, args.height, args.mpp, args.seed)
    print(json.dumps({k: v for k, v in info.items() if k != "regions"}, indent=2))
