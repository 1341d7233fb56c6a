"""Data sets that `datasets` already holds in its local cache, read without the network: sb-eval
fetches nothing at run time, so a data set that is not cached is an error the caller words."""

from __future__ import annotations


def load_cached_dataset(name: str, configuration: str | None, split: str):
    """`datasets.load_dataset(name, configuration, split=split)` with the Hugging Face Hub switched
    off for the call: it reads the datasets cache (or a local folder `name`) and raises where the
    data is not there, as datasets raises offline (a ConnectionError naming OfflineModeIsEnabled)."""
    import datasets  # heavy: imported only where a data set is read
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, configuration, split=split)
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
