import sys

from worker.errors import OpenLoRAError
from worker.runtime import main

try:
    sys.exit(main())
except OpenLoRAError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
