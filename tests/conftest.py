import sys
from pathlib import Path

# Let test modules import the shared helpers in this folder (tests/fixtures.py).
sys.path.insert(0, str(Path(__file__).parent))
