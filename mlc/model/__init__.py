"""The networks: ResNet50 with its frozen stages (:mod:`resnet`), the caption and image+caption networks
(:mod:`fusion`), mixed precision (:mod:`precision`) and device choice (:mod:`device`). No training loop.

May import: :mod:`mlc.io`, :mod:`mlc.data` and the top-level config, errors and logs."""
