"""Export a TorchScript file to ONNX, without a registry (`infermesh models convert` does it for
a registered version and registers the result).

    python scripts/convert_to_onnx.py MODEL.pt SIGNATURE.json OUT.onnx [--module PKG.MOD:CLASS]

SIGNATURE.json is the version's signature (``{"inputs": [...], "outputs": [...]}``, as
``python -m services.worker.demo_models`` writes next to each demo model). The export has a
dynamic batch dim and the signature's names and is checked against TorchScript on a sample
batch; register it with platform ``onnxruntime_onnx``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import Signature
from services.worker.onnx_export import ConversionError, convert_torchscript


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="the TorchScript file")
    parser.add_argument("signature", type=Path, help="its signature, a JSON file")
    parser.add_argument("out", type=Path, help="where to write the .onnx file")
    parser.add_argument("--module", metavar="PACKAGE.MODULE:CLASS",
                        help="the model's eager class, for a graph the exporter cannot follow")
    args = parser.parse_args(argv)
    try:
        signature = Signature.from_json(json.loads(args.signature.read_text()))
        done = convert_torchscript(args.artifact, signature, args.out, module=args.module)
    except (OSError, ValueError, InvalidInput, ConversionError) as exc:
        print(f"convert_to_onnx: error: {exc}", file=sys.stderr)
        return 1
    print(f"{done.artifact}: exported from {done.traced_from}, max abs error "
          f"{done.max_abs_error:.3g} against TorchScript")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
