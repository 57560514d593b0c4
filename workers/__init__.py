"""sononode workers: Celery app, QC, model packs, inference, export."""
