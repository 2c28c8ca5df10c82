"""`python -m fms_acceleration_train`: the training job without the CLI entry point."""

import sys

from .cli import main

# guarded: --compare runs each training in a spawned process, which imports this module again
if __name__ == "__main__":
    sys.exit(main())
