import sys

from s4v.train.main import main

sys.exit(main())
