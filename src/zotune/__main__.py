import sys

from zotune.cli import main

sys.exit(main())
