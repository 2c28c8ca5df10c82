"""`python -m fms_acceleration_train`: the training job without the CLI entry point."""

import sys

from .cli import main

sys.exit(main())
