"""``python -m bmc_fast.export RUN_DIR OUT_DIR [--tag TAG]``: a trained run -> a directory open_clip loads
(``bmc_fast.checkpoint.export``, where the code and its documentation live)."""
from bmc_fast.checkpoint.export import main

if __name__ == "__main__":
    from bmc_fast.cli import run_main

    run_main(main)
