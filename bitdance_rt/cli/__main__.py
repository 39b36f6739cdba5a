"""`python -m bitdance_rt.cli ...`: the same as `bitdance-rt ...`."""

import sys

from . import main

sys.exit(main())
