"""What serving needs of a model pack: read it, load it, show it frames, decide.

- :mod:`~workers.models.manifest`: the manifest schema, validated, torch-free (the API and
  ``sononode model info`` read packs through it);
- :mod:`~workers.models.nets` and :mod:`~workers.models.sononet`: the networks, one file per
  architecture, with what their weights expect;
- :mod:`~workers.models.preprocess`: what the network sees (crop, grey, resize,
  normalisation): the one definition serving and training share;
- :mod:`~workers.models.ood`: out-of-distribution scorers;
- :mod:`~workers.models.packs`: :class:`~workers.models.packs.ModelPack`, loading with
  sha256 checks and typed errors, batched calibrated prediction on the CPU or CUDA;
- :mod:`~workers.models.inference`: :class:`~workers.models.inference.Analyser`,
  study-level results with abstention.

Building packs (training, calibration, evaluation, the SonoNet importer) is
:mod:`modelkit`. Importing this package imports nothing heavy; import the modules.
"""
