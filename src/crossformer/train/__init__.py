"""The training wing: config, data, engine, snapshots, metrics. The model side never imports it."""
from .config import DIGITS_RECIPE, FINETUNE_RECIPE, TrainConfig, load_config, parse_overrides
from .engine import Trainer, evaluate, resume_config, train, validate

__all__ = ['TrainConfig', 'DIGITS_RECIPE', 'FINETUNE_RECIPE', 'load_config', 'parse_overrides', 'Trainer', 'train', 'evaluate', 'validate',
           'resume_config']
