"""`make demo`: run the whole dfl_tf pipeline on a generated slide (no network needed)."""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default=None, help="Output folder (default: the config's 'out').")
    args = parser.parse_args()
    from dfl_tf.demo import demo, print_summary
    from dfl_tf.errors import DflError

    try:
        summary = demo(args.config, out=args.out)
    except DflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
