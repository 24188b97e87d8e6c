"""Domain adaptation from a trained (e.g. ASG) model: class-balanced self-training rounds (``asg adapt``)."""

from asg.adapt.pseudo import PseudoLabels, load_pseudo_labels, pseudo_label
from asg.adapt.rounds import Adaptation, AdaptResult, adapt, portion_of_round
from asg.adapt.thresholds import ConfidenceHistogram, class_thresholds, select

__all__ = [
    "AdaptResult",
    "Adaptation",
    "ConfidenceHistogram",
    "PseudoLabels",
    "adapt",
    "class_thresholds",
    "load_pseudo_labels",
    "portion_of_round",
    "pseudo_label",
    "select",
]
