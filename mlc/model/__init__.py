"""The networks: ResNet50 with its frozen stages (:mod:`resnet`), the caption and image+caption networks
(:mod:`fusion`), mixed precision (:mod:`precision`), device choice (:mod:`device`), ``--compile auto``
(:mod:`compiling`), and the one module that knows a checkpoint's layout (:mod:`checkpoint`). No training loop.

May import: :mod:`mlc.io`, :mod:`mlc.data` and the top-level config, errors, logs and migrate."""
