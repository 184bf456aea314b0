import sys

from collab_server.cli import main

sys.exit(main())
