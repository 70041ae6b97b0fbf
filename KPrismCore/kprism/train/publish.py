"""Make trained weights the bundled model: check, copy into the package, update the manifest.

    python -m kprism.train.publish runs/…/kprism-tiny.safetensors [--name kprism-tiny]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .. import weights
from ..atomic import write_atomically


def publish(source: str | Path, name: str = weights.DEFAULT_MODEL) -> Path:
    """Strictly load `source`, copy it to the package's weights folder and record its hash and classes.

    Only files that record their tensor hash are bundled, so every installed copy can be checked.
    """
    _, catalog, checkpoint = weights.load_model(source)
    if checkpoint.tensors_sha256 is None:
        raise weights.WeightsError(f"{source} carries no tensor hash; re-export it first with "
                                   f"kprism.weights.reexport_checkpoint('{source}'), then publish it.")
    info = weights.get_model_info(name)
    if not info.bundled:
        raise weights.WeightsError(f"Model {name!r} is not marked as bundled in the manifest.")
    target = weights.BUNDLED_DIR / info.filename
    write_atomically(target, lambda temporary: shutil.copyfile(source, temporary),
                     verify=lambda temporary: weights.read_checkpoint(temporary, checkpoint.sha256),
                     suffix=".safetensors")
    weights.update_manifest_entry(name, sha256=checkpoint.sha256, classes=catalog.names,
                                  input_size=checkpoint.config.image_size)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description="Bundle trained weights as a known model.")
    parser.add_argument("weights")
    parser.add_argument("--name", default=weights.DEFAULT_MODEL)
    args = parser.parse_args()
    print(f"bundled {publish(args.weights, args.name)}")


if __name__ == "__main__":
    main()
