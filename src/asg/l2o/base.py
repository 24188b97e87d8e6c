"""The controller contract now lives in the engine (``asg.engine.control``); kept so old imports still work."""

from asg.engine.control import FixedController, LRController, StepStats

__all__ = ["FixedController", "LRController", "StepStats"]
