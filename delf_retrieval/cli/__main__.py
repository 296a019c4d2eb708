"""``python -m delf_retrieval.cli ...``: the ``delf-retrieval`` command."""

import sys

from delf_retrieval.cli.main import main

sys.exit(main())
