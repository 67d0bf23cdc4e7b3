"""bmc-fast: long-context biomedical CLIP training."""


def create_model(*args, **kwargs):
    """``bmc_fast.model.create_model``: a BMC-LongCLIP from a preset, with optional local tower weights."""
    from bmc_fast.model import create_model as _create_model

    return _create_model(*args, **kwargs)


def load_model(*args, **kwargs):
    """``bmc_fast.pretrained.load_model``: (model, tokenizer, eval transform) from an export or a run."""
    from bmc_fast.pretrained import load_model as _load_model

    return _load_model(*args, **kwargs)
