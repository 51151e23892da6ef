"""Benchmark: img/s of the training step and of prediction for unfrozen depths and precisions, measured side
by side in one run (machines are noisy: compare rows of one run, not numbers across runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--depths", default="1,4", help="unfrozen depths to compare (default: %(default)s)")
    p.add_argument("--amp", default="off,bf16", help="precisions to compare: off, auto, bf16 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON list on the last line")
    return p


def main(args: argparse.Namespace) -> list:
    import torch

    from mlc.bench import measure
    from mlc.predict import pick_device
    device = pick_device()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; image size {args.image_size}, batch {args.batch_size}, {args.steps} timed steps")
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for amp in args.amp.split(","):
            r = measure(depth, args.image_size, args.batch_size, amp, device, steps=args.steps)
            rows.append(r)
            print(f"depth {depth}  amp {r['amp']:>14}  train {r['train_img_s']:8.1f} img/s  "
                  f"predict {r['predict_img_s']:8.1f} img/s", flush=True)
    base = rows[0]
    print("ratios to the first row (train, predict):")
    for r in rows:
        print(f"  depth {r['depth']} {r['amp']}: {r['train_img_s'] / base['train_img_s']:.2f}x, "
              f"{r['predict_img_s'] / base['predict_img_s']:.2f}x")
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
