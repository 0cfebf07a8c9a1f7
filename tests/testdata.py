"""Where the test data lives."""

from pathlib import Path

# Copy of ../shared/testdata/official-b: a tiny checkpoint in the official layout and logits
# computed by DeepSeek's official inference code (see its README).
OFFICIAL_B = Path(__file__).parent / "data" / "official-b"
