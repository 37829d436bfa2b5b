"""`python -m cli` runs the `infermesh` command line."""

import sys

from cli.main import main

sys.exit(main())
