"""`python -m fms_acceleration_hpo CONFIG --trials N --storage URL ...` (e.g. under torchrun)."""

import sys

from .cli import main

sys.exit(main())
