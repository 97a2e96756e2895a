"""Training and evaluation of the models: ``cxr-worker train|evaluate ...`` (see :mod:`.cli`).

Runtime code (:mod:`models.analyzer` and the modules it loads) never imports this package.
"""
