"""``python -m lb.tools.launch_vllm``: the same as ``pdlb launch-vllm``."""

import sys

from lb.tools.launch_vllm.cli import main

sys.exit(main())
