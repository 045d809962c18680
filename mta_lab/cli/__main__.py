import sys

from mta_lab.cli import main

sys.exit(main())
