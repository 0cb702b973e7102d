"""`python -m fm_indexer`, the same as the `fm-indexer` command."""

import sys

from . import main

sys.exit(main())
