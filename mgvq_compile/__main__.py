import sys

from mgvq_compile.cli import main

sys.exit(main())
