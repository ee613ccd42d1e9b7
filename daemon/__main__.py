"""Allow `python -m daemon ...` as a synonym of the `edgechat` console script."""
import sys

from .cli import main

sys.exit(main())
