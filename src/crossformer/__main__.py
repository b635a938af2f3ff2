"""``python -m crossformer`` (and ``torchrun -m crossformer``): the ``crossformer`` command."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
