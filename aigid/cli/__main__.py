"""``python -m aigid.cli``."""
import sys

from aigid.cli import main

sys.exit(main())
