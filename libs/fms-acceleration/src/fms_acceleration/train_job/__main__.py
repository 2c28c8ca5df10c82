"""`python -m fms_acceleration.train_job`: the training job without the CLI entry point."""

import sys

from .cli import main

sys.exit(main())
