import sys

from dsv3lab.cli import main

sys.exit(main())
