import sys

from yunque.cli import main

sys.exit(main())
