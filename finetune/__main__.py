"""``python -m finetune``: see :mod:`finetune.cli`."""

import sys

from .cli import main

sys.exit(main())
