"""Makes the test support package (tests/support, imported as ``support``) importable for the
benchmarks that reuse test assets; the pack itself is the installed package ``omniid``."""
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
