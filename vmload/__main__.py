import sys

from vmload.cli import main

sys.exit(main())
