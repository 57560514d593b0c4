"""What the Celery workers run: the job stages and what they need.

- :mod:`~workers.celery_app` (the one Celery app), :mod:`~workers.tasks` (thin tasks),
  :mod:`~workers.dispatch` (sending work by task name, for the scheduler and the API),
  :mod:`~workers.signals` (the workers' metrics);
- :mod:`~workers.pipeline`: the stages, each "load rows, call one function, record";
- :mod:`~workers.imaging`: decoding, scan region and quality control;
- :mod:`~workers.models`: model packs and inference;
- :mod:`~workers.export`: the C-STORE client that delivers reports.

The node's core (:mod:`node`) never imports this package; only its composition root,
``node/cli.py``, wires it in.
"""
