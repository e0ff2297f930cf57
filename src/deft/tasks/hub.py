"""Loading a task's data from the Hugging Face hub, with an actionable error when it is out of reach."""

from __future__ import annotations

import datasets

DATA_DIR_ENV = "DEFT_DATA_DIR"


class DataNotAvailableError(RuntimeError):
    """The dataset is in no configured data directory and the hub cannot be reached."""


def load_hub_dataset(path: str, *args, local_layout: str, **kwargs) -> datasets.Dataset:
    """``datasets.load_dataset(path, ...)``; an unreachable hub becomes a :class:`DataNotAvailableError`
    that says how to run from local files instead (``local_layout`` describes what the directory holds)."""
    try:
        return datasets.load_dataset(path, *args, **kwargs)
    except ConnectionError as err:  # datasets raises it for no network and for HF_HUB_OFFLINE alike
        raise DataNotAvailableError(
            f"cannot load {path!r} from the Hugging Face hub ({err}). Without internet, point --data-dir or "
            f"${DATA_DIR_ENV} at a local copy: {local_layout}") from err
