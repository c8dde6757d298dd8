"""Baselines STEER is compared against: routers that decide per query, judges, reward models.

Each baseline lives in its own module (e.g. `steer_jax.baselines.query_router`); nothing is
re-exported here so that importing one baseline never pulls in another's dependencies.
"""
