"""Search: the space, one trial's objective, the Optuna study, and the Pareto front."""
