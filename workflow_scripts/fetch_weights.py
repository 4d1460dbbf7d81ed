"""Fetch Keras' ImageNet weights for one backbone into the cache (head node, before training).

Writes a manifest (file name, origin, hash, path) that training jobs read; with the file
already cached and intact, nothing is downloaded.

    python workflow_scripts/fetch_weights.py --backbone VGG16 --input-size 32 \\
        --cache resources/weights --manifest resources/weights/VGG16-32px.json
"""

from __future__ import annotations

import sys

from cnnstudy import cli
from cnnstudy.files import write_json


def main(backbone: str, cache: str, manifest: str, input_size: int = 32, mirror: str | None = None) -> dict:
    from cnnstudy import weights

    info = weights.fetch(backbone, cache, input_size=input_size, mirror=mirror)
    write_json(manifest, info)
    return info


HELP = {
    "backbone": "keras.applications model name, e.g. VGG16",
    "cache": "directory that holds the weight files",
    "manifest": "output JSON manifest",
    "mirror": "base URL serving Keras' weight files (default: Keras' origin)",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
