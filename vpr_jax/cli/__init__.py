"""The command-line entry points: flags -> one library call; user errors -> one line, exit 1.

`python -m vpr_jax.train | eval | convert | prepare` run the modules of this package.
"""
