"""Speed, measured side by side in one run (jobs/bench.py): the model alone (:mod:`model`), the whole input
pipeline against the 2020 report's (:mod:`e2e`), and the GPU check (:mod:`gpu`).

May import: io, data, model, train and the top level; not distributed (jobs/bench.py brings Ray itself)."""
