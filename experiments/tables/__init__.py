"""Scripts that reproduce the papers' small-scale tables: `python -m experiments.tables.<name>`
prints the table, writes a CSV and a plot, and ends with one line saying whether the paper's
claim held at this scale (and why not, where not)."""
