"""`python -m r1lab ...`: the `r1lab` command, also as torchrun's module (`torchrun -m r1lab pretrain ...`)."""

import sys

from r1lab.cli import main

sys.exit(main())
