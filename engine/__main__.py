"""``python -m engine`` is the ``tern`` command."""

import sys

from engine.cli.main import main

sys.exit(main())
