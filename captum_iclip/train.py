"""``python -m captum_iclip.train``: ICLIP training (:mod:`captum_iclip.cli.train`, :mod:`captum_iclip.training.iclip`).

Examples::

    torchrun --nproc-per-node 2 -m captum_iclip.train --train-data data/train.csv --model ViT-B-16 ...
"""

from captum_iclip.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
