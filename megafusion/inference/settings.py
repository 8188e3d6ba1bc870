"""GenerationConfig: every sampling setting of `megafusion generate` and `megafusion.inference.Engine`, validated.

Text: greedy (temperature 0) or temperature / top-k / top-p sampling, stopping on EOS or the token limit.
Images: `steps` solver steps from t = 0 (noise) to t = 1 (clean) with an optional timestep shift, Euler or a
second-order solver, classifier-free guidance (`cfg_scale`, 1 = off) applied for t inside `cfg_interval`.
Defaults are the reference setup's: 25 Euler steps, guidance scale 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

SOLVERS = ("euler", "heun", "midpoint")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Tokens the model may sample per prompt (BOI included; the EOI appended after an image is not counted)."""
    temperature: float = 0.0
    """0 = greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = all)."""
    allow_images: bool = True
    """The model may start an image by sampling BOI; false masks BOI out of text sampling."""
    force_image: bool = False
    """Start an image right after the prompt (text-to-image), then continue with text."""
    frames: int = 1
    """Frames of each generated image: 1 = a still image, N > 1 = a video of N frames (each its own block)."""
    steps: int = 25
    """Solver steps per image or frame (the reference setup uses 25)."""
    solver: str = "euler"
    """euler (first order, one model call per step) | heun | midpoint (second order, two calls per step)."""
    timestep_shift: float = 1.0
    """s >= 1 spends more steps near noise: t' = t / (t + s * (1 - t)) (the training objective's shift form)."""
    cfg_scale: float = 3.0
    """Classifier-free guidance v = v_uncond + s * (v_cond - v_uncond); 1 = no guidance (one branch only)."""
    cfg_interval: Tuple[float, float] = (0.0, 1.0)
    """Guidance is applied only for flow times t in [lo, hi] (BAGEL guides only part of the trajectory)."""

    def __post_init__(self):
        self.cfg_interval = tuple(float(x) for x in self.cfg_interval)
        _check(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        _check(self.frames >= 1, f"frames={self.frames} must be >= 1")
        _check(self.steps >= 1, f"steps={self.steps} must be >= 1")
        _check(self.solver in SOLVERS, f"solver={self.solver!r} is not one of {list(SOLVERS)}")
        _check(self.timestep_shift >= 1.0, f"timestep_shift={self.timestep_shift} must be >= 1")
        _check(self.cfg_scale >= 0, f"cfg_scale={self.cfg_scale} must be >= 0 (1 = no guidance)")
        lo, hi = self.cfg_interval if len(self.cfg_interval) == 2 else (1.0, 0.0)
        _check(len(self.cfg_interval) == 2 and 0.0 <= lo <= hi <= 1.0,
               f"cfg_interval={self.cfg_interval} must be two flow times 0 <= lo <= hi <= 1")

    def guided(self, t: float) -> bool:
        """Whether the unconditional branch runs at flow time t."""
        lo, hi = self.cfg_interval
        return self.cfg_scale != 1.0 and lo <= t <= hi

    def to_dict(self) -> dict:
        out = asdict(self)
        out["cfg_interval"] = list(self.cfg_interval)
        return out
