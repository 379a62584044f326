"""``python -m loadgen`` = ``pdlb loadgen``."""

from loadgen.cli import main

raise SystemExit(main())
