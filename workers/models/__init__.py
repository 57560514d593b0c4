"""Model packs and inference of the node.

Modules: :mod:`~workers.models.nets` (networks), :mod:`~workers.models.packs` (pack loading,
``FORMAT_VERSION``, typed errors, batched prediction), :mod:`~workers.models.inference`
(:class:`~workers.models.inference.Analyser`: study-level results with abstention),
:mod:`~workers.models.calibration` (temperature scaling, ECE, ROC, Youden),
:mod:`~workers.models.data`, :mod:`~workers.models.train`, :mod:`~workers.models.evaluate`
(training and evaluation on simulated or labelled DICOM data) and :mod:`~workers.models.cli`
(``sononode model ...``). Importing this package imports nothing heavy; import the modules.
"""
