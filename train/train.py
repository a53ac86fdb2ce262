"""Entry script for launchers that want a file: ``torchrun --nproc_per_node 8 train/train.py --config ...``.

Same as the ``quietstar-train`` console script (``quietstar.training.cli:main``).
"""

import sys

from quietstar.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
