# benchmarks/ is a folder of scripts beside the package, not installed: make `import benchmarks` work in every
# test (the slow reference implementations live there, beside the benchmarks that time them)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
