from stn_jax.cli import entry_point

entry_point()
