"""`python -m jaxlm`: the `jaxlm` command."""

import sys

from jaxlm.cli.main import main

sys.exit(main())
