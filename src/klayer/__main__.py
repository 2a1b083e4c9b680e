import sys

from klayer.cli.main import main

sys.exit(main())
