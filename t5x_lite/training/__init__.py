"""Training: optimizers, sharded train state, the jitted step, the loop, metrics and MFU.

    from t5x_lite.training import train
    train(config, workdir)   # what `python -m t5x_lite.train` runs
"""
from t5x_lite.training.trainer import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]
