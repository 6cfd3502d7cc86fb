"""``python -m ep_megatron`` (and ``torchrun -m ep_megatron``): the ``ep-megatron`` command line."""

import sys

from ep_megatron.trainer.cli import main

sys.exit(main())
