"""Training utilities: ICLIP fine-tuning and the tiny DINO mask-source trainer.

Submodules are imported explicitly, e.g. ``from captum_iclip.training.dino import train_dino``,
so that importing one trainer does not pull in the others' dependencies.
"""
