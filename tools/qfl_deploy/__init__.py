"""Loopback Flower deployments for tests and experiments: SuperNodes, TLS, authentication.

Not part of the qfl wheel: a user of qfl runs their own SuperLink and SuperNodes. This
harness builds them on this machine from the SuperLink that :mod:`qfl.simulations.superlink`
starts for the runner, adding what only a deployment needs: ``flower-supernode``
processes, throwaway certificates (``trustme``), SuperNode keys (``cryptography``),
restarts and refusals (:mod:`.federation`), and the ``tools/deploy.py`` command that runs
the simulation app on them (:mod:`.deploy`). Tests import it through ``tests/conftest.py``.
"""
