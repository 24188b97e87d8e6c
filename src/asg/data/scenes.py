"""Moved: the toy digit-scenes benchmark is now :mod:`asg.data.segmentation.digit_scenes` (this shim keeps the old
import path working)."""

from asg.data.segmentation.digit_scenes import *  # noqa: F403
from asg.data.segmentation.digit_scenes import build_digit_scenes

__all__ = ["build_digit_scenes"]
