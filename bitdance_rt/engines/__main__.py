"""`python -m bitdance_rt.engines --export-dir DIR ...`: `bitdance-rt build` in a process without torch."""

import sys

from ..cli import main

sys.exit(main(["build", *sys.argv[1:]]))
