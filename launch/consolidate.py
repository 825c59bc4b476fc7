#!/usr/bin/env python
"""python launch/consolidate.py OUT/checkpoints --out reward.pt [--tag step_N]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rm_trainer.cli import main_consolidate  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_consolidate(sys.argv[1:]))
