"""BAGEL's clean copies of frames: how many times a frame is laid out, and the reference expansion of a layout.

With objective.captioning = "bagel" (docs/objectives.md, "Captioning") every frame of a document (an image, or
one video frame) is laid out twice, back to back:

    noised copy   the frame's patches, noised=True (trained with flow matching), its own block id
    clean copy    the same patches, noised=False, the next block id

so a video's frames become n1 c1 n2 c2 ... and one frame costs 2 x patches_per_frame positions. Under
model.hide_noised_latents the attention layout (megafusion/model/attention/layout.py) hides every noised
position from the positions outside its block: later text and later frames read the clean copy, and the caption
is trained on exactly clean latents. The pair is adjacent, so it belongs to one media item: condition dropout
(megafusion/objectives/flow_matching.py) drops the conditioning of both copies together.

`frame_copies(captioning)` is the number of copies (1 for "transfusion", 2 for "bagel"); it travels as `copies`
to every data path that lays out frames: the row planner (packing.py, plan_kernel.py: a frame costs copies x
patches_per_frame positions), the compiled writer (collate_packed.py, packed_kernels.write_rows), `layout_row`
and the synthetic generator (synthetic.py). `with_clean_copies(parts)` is the reference expansion for `collate`.
"""

from __future__ import annotations

from typing import List, Sequence

from megafusion.config.schema import CAPTIONING_RULES
from megafusion.data.collate import FramePart, Part

COPIES = {"transfusion": 1, "bagel": 2}
assert set(COPIES) == set(CAPTIONING_RULES)


def frame_copies(captioning: str) -> int:
    """Times each frame is laid out under the captioning rule `captioning` (objective.captioning)."""
    if captioning not in COPIES:
        raise ValueError(f"objective.captioning={captioning!r} is not one of {list(CAPTIONING_RULES)}")
    return COPIES[captioning]


def check_copies(copies: int) -> int:
    """`copies` itself, after checking it is 1 or 2 (the values frame_copies gives)."""
    if copies not in (1, 2):
        raise ValueError(f"copies={copies}: a frame is laid out once (objective.captioning=transfusion) or twice "
                         f"(objective.captioning=bagel)")
    return copies


def with_clean_copies(parts: Sequence[Part]) -> List[Part]:
    """A document's parts with every noised FramePart followed by a clean copy of the same patches (the arrays
    are shared, not copied). Frames that are already clean (noised=False: conditioning only) stay single: their
    latents are visible as they are."""
    out: List[Part] = []
    for part in parts:
        out.append(part)
        if isinstance(part, FramePart) and part.noised:
            out.append(FramePart(part.patches, noised=False))
    return out
