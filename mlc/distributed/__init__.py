"""Ray: the cluster and its autoscaler (:mod:`cluster`), Ray Train DDP runs (:mod:`train`), Ray Tune sweeps
(:mod:`tune`), Ray Data prediction (:mod:`predict`) and what Ray Train kept in a run folder (:mod:`runs`).
The only subpackage that imports Ray (``import mlc`` loads none of it, so it stays light).

May import: everything below it (io, data, model, eval, train) and the top level."""
