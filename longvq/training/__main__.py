"""`python -m longvq.training ...` (and `torchrun -m longvq.training`, `accelerate launch -m longvq.training`): the
`longvq-train-clm` command, with its exit status."""

import sys

from ..cli import train_clm

if __name__ == "__main__":
    sys.exit(train_clm())
