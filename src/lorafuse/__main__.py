import sys

from lorafuse.cli.main import main

sys.exit(main())
