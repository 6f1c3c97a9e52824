"""Research workflow: experiment runner, Optuna sweeps and result plots.

`runner` runs every variant x seed of an experiment file and appends rows to a results
table; `sweep` runs an Optuna study over gin parameters; `plots` draws loss curves and
bar charts from the results with matplotlib (Agg backend, no display needed).
"""
