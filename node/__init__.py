"""sononode: the DICOM node (listener, index, scheduler, API, CLI)."""
