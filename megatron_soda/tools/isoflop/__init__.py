"""`soda isoflop`: the SODA scaling-law study as a tool: plan a grid (plan.py), run it (run.py), fit
it (fit.py), plot it (plot.py).

FLOPs convention (stated in every output): the paper's, C = 3 x forward FLOPs x tokens with the
forward counting every matmul incl. the LM head and the full attention map; `--flops 6nd` counts
C = 6 N D with N non-embedding instead. N in plans, fits and plots is the total parameter count
with both embedding matrices, as the paper sizes its sweep (non-embedding kept as a column).
Fitting follows the paper (Chinchilla "approach 2"):
per budget a parabola of loss against log N gives N*, D* (from the tokens the grid trained) and L*, then power laws
N* = k C^a and D* = k' C^b by log-linear regression, with bootstrap confidence intervals. The
parametric surface L(N, D) = E + A / N^alpha + B / D^beta is fitted as a cross-check
(a = beta / (alpha + beta), b = alpha / (alpha + beta)). A budget whose minimum is not inside its
grid is flagged and left out of the power laws, never silently extrapolated.
"""
