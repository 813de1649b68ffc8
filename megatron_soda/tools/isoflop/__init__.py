"""`soda isoflop`: the SODA scaling-law study as a tool: plan a grid (plan.py), run it (run.py), fit
it (fit.py), plot it (plot.py).

FLOPs convention (stated in every output): C = 6 N D with N the non-embedding parameters, as the
paper counts; `--flops attention` uses our per-token training FLOPs instead (matmuls incl. LM head
+ attention scores, `model.flops_per_token`). Fitting follows the paper (Chinchilla "approach 2"):
per budget a parabola of loss against log N gives N*, D* = C / (6 N*) and L*, then power laws
N* = k C^a and D* = k' C^b by log-linear regression, with bootstrap confidence intervals. The
parametric surface L(N, D) = E + A / N^alpha + B / D^beta is fitted as a cross-check
(a = beta / (alpha + beta), b = alpha / (alpha + beta)). A budget whose minimum is not inside its
grid is flagged and left out of the power laws, never silently extrapolated.
"""
