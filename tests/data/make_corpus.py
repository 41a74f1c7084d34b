"""Regenerate the crafted run files of tests/data (one per case of tests/_crafted.py).

    python tests/data/make_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _crafted import DAMAGES, crafted

if __name__ == "__main__":
    for old in HERE.glob("*.h5"):
        old.unlink()
    for name in sorted(DAMAGES):
        path = crafted(HERE, name)
        print(f"{path.name}: {path.stat().st_size} bytes")
