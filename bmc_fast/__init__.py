"""bmc-fast: long-context biomedical CLIP training."""


def create_model(*args, **kwargs):
    """``bmc_fast.model.create_model``: a BMC-LongCLIP from a preset, with optional local tower weights."""
    from bmc_fast.model import create_model as _create_model

    return _create_model(*args, **kwargs)
