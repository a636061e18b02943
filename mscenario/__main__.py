import sys

from mscenario.cli import main

sys.exit(main())
