"""Training and evaluation datasets read from folders given on the command line: CheXpert and
MIMIC-CXR-JPG (:mod:`.chexpert`), a plain folder + label CSV (:mod:`.folder`) and lung-mask pairs
(:mod:`.masks`)."""
