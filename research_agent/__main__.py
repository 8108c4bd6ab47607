"""``python -m research_agent "question"``."""

import sys

from research_agent.cli import main

sys.exit(main())
