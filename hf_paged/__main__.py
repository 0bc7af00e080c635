"""``python -m hf_paged ...`` = ``hf-paged ...``; also the module torchrun starts:
``torchrun --nproc-per-node N -m hf_paged serve --tp-plan auto``."""
from .cli import main

if __name__ == "__main__":
    main()
