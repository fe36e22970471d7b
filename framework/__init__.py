"""The experiment machinery: schemas, start-up checks, training runs, callbacks, sweeps.

The only package that knows Hydra/OmegaConf, Lightning's Trainer, loggers and run directories.
Imports run one way: ``main.py → framework → {models, datamodules} → convnn``.
"""
