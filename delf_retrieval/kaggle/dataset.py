"""A dataset folder in the Kaggle GLDv2 layout."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from delf_retrieval.features.images import (
    check_image_id,
    read_ids_csv,
    read_labels_csv,
    read_text_csv,
)

# CSVs whose ids a retrieval submission lists space-separated in one cell.
_SPACE_FREE_IDS = ("index.csv",)
# CSVs that must list at least one image for a run to mean anything.
_NOT_EMPTY = ("train.csv", "index.csv")


@dataclass
class KaggleData:
    """Paths of a dataset in the Kaggle GLDv2 layout (any of them may be absent)."""

    root: Path
    _checked: set[str] = field(default_factory=set, repr=False, compare=False)

    def csv(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def require(self, *names: str) -> None:
        """Raise unless every CSV of ``names`` exists and passes :meth:`check` (before any work)."""
        missing = [name for name in names if not self.has(name)]
        if missing:
            raise FileNotFoundError(
                f"{self.root} is not a Kaggle-layout dataset: missing {', '.join(missing)} "
                "(expected train.csv + train/, sample_submission.csv + test/, for retrieval index.csv + index/)"
            )
        for name in names:
            self.check(name)

    def check(self, name: str) -> None:
        """Check one CSV as a run will read it, so that a bad input stops the run before
        any extraction: readable, an ``id`` column, ids that stay inside their image
        folder, no id twice; ``train.csv`` also integer landmark ids, one landmark per id
        and at least one row; ``index.csv`` ids without spaces (a retrieval submission
        separates them by spaces). Raises ValueError naming the file and the offending id."""
        if name in self._checked:
            return
        path = self.csv(name)
        ids = read_ids_csv(path)
        for image_id in ids:
            check_image_id(image_id, str(path))
        if name == "train.csv":
            read_labels_csv(path)  # landmark ids, and one landmark per id
        repeated = [image_id for image_id, count in Counter(ids).items() if count > 1]
        if repeated:
            raise ValueError(f"{path}: image id {repeated[0]!r} is listed more than once ({len(repeated)} such ids)")
        if name in _SPACE_FREE_IDS:
            spaced = [image_id for image_id in ids if "".join(image_id.split()) != image_id]
            if spaced:
                raise ValueError(
                    f"{path}: image id {spaced[0]!r} contains whitespace, which the space-separated "
                    "retrieval submission cannot hold"
                )
        if name in _NOT_EMPTY and not ids:
            raise ValueError(f"{path} lists no image (only a header)")
        self._checked.add(name)

    def sample(self) -> pd.DataFrame:
        """``sample_submission.csv``, every cell as text."""
        return read_text_csv(self.csv("sample_submission.csv"))
