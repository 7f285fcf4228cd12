"""``python -m captum_iclip.cli``: the ``captum-iclip`` command."""

import sys

from captum_iclip.cli import main

sys.exit(main())
