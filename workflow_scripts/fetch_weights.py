"""Fetch Keras' ImageNet weights for one backbone into the cache (head node, before training).

Writes a manifest (file name, origin, hash, path) that training jobs read; with the file
already cached and intact, nothing is downloaded.

    python workflow_scripts/fetch_weights.py --backbone VGG16 --input-size 32 \\
        --cache resources/weights --manifest resources/weights/VGG16.json
"""

from __future__ import annotations

import argparse
import sys

from cnnstudy import cli
from cnnstudy.files import write_json


def main(backbone: str, cache: str, manifest: str, input_size: int = 32, mirror: str | None = None) -> dict:
    from cnnstudy import weights

    info = weights.fetch(backbone, cache, input_size=input_size, mirror=mirror)
    write_json(manifest, info)
    return info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="keras.applications model name, e.g. VGG16")
    p.add_argument("--cache", required=True, help="directory that holds the weight files")
    p.add_argument("--manifest", required=True, help="output JSON manifest")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--mirror", default=None, help="base URL serving Keras' weight files (default: Keras' origin)")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
