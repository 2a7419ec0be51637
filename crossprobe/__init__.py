"""crossprobe's front door: the ``crossprobe`` command line.

``crossprobe/cli.py`` is the table of every command. A command lives in the room it belongs to
(``simulations/`` for simulate, experiment and the benches; ``deploy/`` for certs, preflight,
launch and compose); the two that serve every room live here: ``data`` (make, validate, ingest and
export site folders) and ``audit`` (check the ledgers). The product's code lives in ``common/``
(the framework-free core), ``clients/`` (the site), ``server/`` (the coordinator), ``deploy/``
(real deployment) and ``simulations/`` (sites on one machine); docs/architecture.md maps them.
"""
