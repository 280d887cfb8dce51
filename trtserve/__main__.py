"""``python -m trtserve serve ...``: the same as the ``trtserve`` console script."""
from .cli import main

raise SystemExit(main())
