"""Real deployment: one hospital per host, a coordinator elsewhere, only weights in between.

- ``deploy/argv.py`` — the ONE place the Flower 1.42 command lines are written (TLS everywhere,
  SuperNode authentication, process isolation, SuperExec shared secret, no runtime installs);
- ``deploy/certs.py`` (``crossprobe certs``) — a CA, the SuperLink server certificate, and per site
  an ECDSA P-384 OpenSSH key pair, a certificate for the SuperNode's runtime API and a secret;
- ``deploy/compose.py`` (``crossprobe compose``) — ``docker-compose.yml`` and
  ``deploy/*.compose.yml`` generated from those command lines (a test checks the committed files
  equal the generated ones);
- ``deploy/launch.py`` (``crossprobe launch``) — register the SuperNode keys, ``flwr run``, wait,
  and return the run's real status (``flwr run`` exits 0 even when the run failed);
- ``deploy/preflight.py`` (``crossprobe preflight``) — is a site (or the coordinator) ready to join.

docs/deployment.md walks a hospital through it.
"""
