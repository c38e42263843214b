"""HEAR 2021 API module for EfficientAT models (https://hearbenchmark.com): pass this module's
name, `hear_efficientat`, to the HEAR evaluation kit.

    import hear_efficientat as hear
    model = hear.load_model(model_name="mn10_as")           # or load_model("my_weights.pt", "mn04_as")
    scene = hear.get_scene_embeddings(audio, model)         # audio: (n_sounds, n_samples) at 32 kHz
    emb, timestamps_ms = hear.get_timestamp_embeddings(audio, model)

How the embeddings are computed, and the configurable timestamp hop and window: helpers/inference/hear.py.
"""
from helpers.inference.hear import HearModel, get_scene_embeddings, get_timestamp_embeddings, load_model

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]
