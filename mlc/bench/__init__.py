"""Measured side by side in one run: the model alone (:mod:`model`), the whole input pipeline against the 2020
report's (:mod:`e2e`), the GPU check (:mod:`gpu`) for jobs/bench.py, and what each ``--inputs`` scores on one
split beside a linear caption baseline (:mod:`inputs`, for jobs/compare_inputs.py), the recipe's losses, EMA
and backbones over seeds (:mod:`recipes`, for jobs/compare_recipes.py; :mod:`seeds`: mean and standard error).

May import: everything below it but distributed (jobs/bench.py brings Ray itself), and the top level."""
