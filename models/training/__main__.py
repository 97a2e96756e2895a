"""``python -m models.training train|evaluate ...`` (see :mod:`models.training.cli`)."""

from models.training.cli import main

raise SystemExit(main())
