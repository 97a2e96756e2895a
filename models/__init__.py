"""Imaging models: Pix2Pix lung mask, OpenCV crop, Model 1, Model 2, view classifier,
the weights registry, training and evaluation. Never imports :mod:`worker` or DICOM code."""
