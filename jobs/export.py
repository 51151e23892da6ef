"""Export a trained model to a file that scores without mlc: TorchScript (plain torch) or ONNX (onnxruntime,
TensorRT, ...), with model.json beside it: the label list, the run's threshold and the rule that applies it, the
preprocessing as plain Python (PIL and numpy), and the checkpoint's sha256.

The exported graph takes uint8 RGB images (N, 3, S, S) and returns each label's probability (N, C). A network that
reads captions (--inputs caption or image+caption) takes them as token ids and offsets instead of, or beside, the
images; model.json then holds the tokenizer and a plain-Python recipe that turns captions into those ids
(docs/serving.md).

examples:
  python jobs/export.py --checkpoint runs/demo --format onnx --output runs/demo/export
  python jobs/export.py --checkpoint gs://b/sweeps/s1 --format torchscript --output gs://b/sweeps/s1/export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mlc.cli import add_log_args, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run or sweep folder, best/, epoch_NNNN/ or a model.pt in one")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"),
                   help="torchscript: torch.jit.load in plain torch; onnx: onnxruntime and other ONNX runtimes "
                        "(needs the onnx package: pip install -e '.[export]')")
    p.add_argument("--output", required=True, help="folder for the model file and model.json (local or gs://)")
    add_log_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    from mlc.logs import say
    from mlc.prediction.export import export
    return export(args.checkpoint, args.output, args.format, log=say)


if __name__ == "__main__":
    run_job(main, get_args_parser())
