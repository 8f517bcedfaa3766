# benchmarks/ is a folder of scripts beside the package, not installed: make `import benchmarks` work here
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
