"""`python -m harness.cli` is `vtbench`."""
import sys

from harness.cli.main import main

sys.exit(main())
