"""The simulation app and the tooling that runs and compares it.

What belongs here: qfl as a Flower App (``server_app``, ``client_app``, ``settings``: the
run config, ``workloads``, ``models``, and the data: ``fashion_mnist`` reads the files,
``partition`` splits a pool among clients, ``data`` makes a client's tensors,
``shakespeare`` is the text workload, ``store`` the one on-disk cache), what runs it on one
machine (``runner``, with ``superlink``: a local SuperLink in simulation mode), and what
turns its results into evidence (``results``: the one result schema, ``compare``,
``links``, ``report``). Everything a user imports to run experiments, nothing more:
harnesses that start SuperNodes, certificates and keys for tests live outside the wheel
in ``tools/qfl_deploy``. The compression itself belongs in :mod:`qfl.strategies` and
:mod:`qfl.clients`, never here.
"""
