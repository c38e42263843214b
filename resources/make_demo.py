"""Synthesize resources/demo_bells.wav, the demo clip used by the README's first command.

Four struck bells (inharmonic partials with exponential decay), 6 s, 32 kHz, 16-bit mono.
Deterministic: re-running it reproduces the committed file.

    python resources/make_demo.py
"""
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 32000
DURATION_S = 6.0
STRIKES_S = (0.0, 1.5, 3.0, 4.5)
# (frequency Hz, amplitude, decay time constant s) of a bell's partials
PARTIALS = ((523.0, 1.0, 0.5), (1244.74, 0.5, 1 / 3), (1443.48, 0.4, 0.8 / 3), (2824.2, 0.2, 0.5 / 3))


def bells() -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * DURATION_S)) / SAMPLE_RATE
    x = np.zeros_like(t)
    for start in STRIKES_S:
        since = np.clip(t - start, 0.0, None)
        active = t >= start
        for freq, amp, decay in PARTIALS:
            x += active * amp * np.exp(-since / decay) * np.sin(2 * np.pi * freq * since)
    return (0.2 * x).astype(np.float32)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "demo_bells.wav"
    sf.write(out, bells(), SAMPLE_RATE, subtype="PCM_16")
    print(f"wrote {out}")
