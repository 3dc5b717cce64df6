import sys

from fastsam.bench.cli import main

sys.exit(main())
