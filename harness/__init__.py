"""Real peers for the node's own tests and benchmarks (not used by the running node).

:mod:`harness.peers` finds free ports, starts an Orthanc PACS, ``sononode up`` and DCMTK
senders, and waits for each with a readiness poll, never a fixed sleep.
"""
