"""python -m benchmarks: natgwd against other NAT data planes (see benchmarks/compare.py)."""

import sys

from benchmarks.compare import main

sys.exit(main())
