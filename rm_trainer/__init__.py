"""rm_trainer: Bradley-Terry reward models on DeepSpeed ZeRO-2/3."""

from rm_trainer.artifact import load_reward_model
from rm_trainer.data import get_preference_iterator
from rm_trainer.loss import bradley_terry_loss, margin, preference_accuracy
from rm_trainer.model import RewardModel, gather_last

__all__ = ["RewardModel", "bradley_terry_loss", "gather_last", "get_preference_iterator", "load_reward_model", "margin",
           "preference_accuracy"]
