#!/usr/bin/env python
"""rm-consolidate as a script: python launch/consolidate.py --checkpoint_dir OUT/checkpoints --output reward.pt"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rm_trainer.cli.consolidate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
