"""A dataset folder in the Kaggle GLDv2 layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class KaggleData:
    """Paths of a dataset in the Kaggle GLDv2 layout (any of them may be absent)."""

    root: Path

    def csv(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def require(self, *names: str) -> None:
        missing = [name for name in names if not self.has(name)]
        if missing:
            raise FileNotFoundError(
                f"{self.root} is not a Kaggle-layout dataset: missing {', '.join(missing)} "
                "(expected train.csv + train/, sample_submission.csv + test/, for retrieval index.csv + index/)"
            )

    def sample(self) -> pd.DataFrame:
        """``sample_submission.csv``, every cell as text."""
        return pd.read_csv(self.csv("sample_submission.csv"), dtype=str, keep_default_na=False)
