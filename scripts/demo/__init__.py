"""``make demo``: one command that shows the framework doing its job, and audits the result.

Modules: ``__main__`` runs the demo; ``setup`` names the run, applies migrations and creates
topics; ``fleet`` starts, kills and stops worker processes; ``probe`` reads progress from the
database and the broker; ``display`` draws it live; ``audit`` checks the outcome against the
load generator's ground truth; ``report`` prints the verdict; ``chart`` draws the PNG.
"""
