"""EfficientAT's Python API in one import (the code is helpers/inference/api.py):

    from efficientat import Tagger
    tagger = Tagger("mn04_as")
    print(tagger.tag("resources/demo_bells.wav"))
"""
from helpers.inference.api import Tagger
from helpers.inference.sed import Event

__all__ = ["Tagger", "Event"]
