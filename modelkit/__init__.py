"""The model toolkit behind ``sononode model ...``: what a site uses to build model packs.

Modules: :mod:`~modelkit.data` (labelled frame sets, simulated or read from DICOM, through
the node's own decoding, QC and pre-processing), :mod:`~modelkit.train` (training,
calibration and distillation of the multi-task network, the reference pack recipe),
:mod:`~modelkit.calibration` (temperature scaling, ECE, ROC, Youden, study bootstrap),
:mod:`~modelkit.evaluate` (evaluation reports and model cards), :mod:`~modelkit.sononet_import`
(SonoNet-16 weights into a pack), :mod:`~modelkit.packs_io` (writing packs),
:mod:`~modelkit.testing` (tiny packs for tests) and :mod:`~modelkit.cli`. The running node
never imports this package; it reads the packs the toolkit writes.
"""
