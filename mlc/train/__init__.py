"""One training run: the run driver (:mod:`driver`: checks, ``--fresh``, config.json and outputs around training,
for local mode and Ray alike; ``fit`` is local mode), the training loop every training process runs
(:mod:`loop`, from a :class:`setup.Run`), the step (:mod:`engine`), the group a process trains in
(:mod:`group`), notices, step checkpoints and interruptions (:mod:`interrupts`), a finished run's outputs (:mod:`outputs`), the run folder's epochs and best/
(:mod:`run_folder`) and TensorBoard (:mod:`tracking`).

May import: io, data, model, eval, prediction and the top-level config, errors, logs and migrate; never Ray."""
