"""Ray: the cluster and its autoscaler (:mod:`cluster`), Ray Train DDP runs (:mod:`train`: the run driver's Ray
mode and the group its workers train in), Ray Tune sweeps (:mod:`tune`), Ray Data prediction (:mod:`predict`),
what Ray Train kept in a run folder (:mod:`ray_folder`), Ray Serve (:mod:`serve`; what a request may be, and how it
is read: :mod:`serve_http`), and the benchmarks that need Ray (:mod:`serve_bench`, :mod:`spot_bench`). The only subpackage that
imports Ray (``import mlc`` loads none of it, so it stays light).

May import: everything below it and the top level."""
