"""The bundled sample set: generated clips of one moving shape, with questions whose answers follow from
the video, in the evaluation format. Written on demand so that the eval runs end to end offline."""

from __future__ import annotations

import json
from pathlib import Path

from models.samples import render_frames, sample_video

OPTIONS = ["A. left", "B. right", "C. up", "D. down"]
LETTER = {"left": "A", "right": "B", "up": "C", "down": "D"}
CLIPS = [("circle", "red", "right"), ("square", "blue", "left"), ("triangle", "green", "up"),
         ("circle", "yellow", "down"), ("square", "red", "up"), ("triangle", "blue", "right")]


def write_sample_set(root: str | Path) -> Path:
    """Writes ``root/videos/*.mp4``, ``root/images/*.png`` and ``root/shapes.json``; returns the JSON path."""
    import cv2

    root = Path(root)
    rows = []
    for i, (shape, color, direction) in enumerate(CLIPS):
        rel = f"videos/{i:02d}_{color}_{shape}_{direction}.mp4"
        sample_video(root / rel, shape, color, direction, seconds=2.0, fps=8.0, seed=i)
        rows.append({"problem_id": len(rows), "problem": f"Which direction does the {color} {shape} move?",
                     "options": OPTIONS, "solution": f"<answer>{LETTER[direction]}</answer>",
                     "problem_type": "multiple choice", "data_type": "video", "path": rel, "data_source": "shapes"})
        rows.append({"problem_id": len(rows), "problem": "How many shapes move in the video?", "options": [],
                     "solution": "<answer>1</answer>", "problem_type": "numerical", "data_type": "video",
                     "path": rel, "data_source": "shapes"})
    for i, (shape, color, _) in enumerate(CLIPS[:2]):
        rel = f"images/{i:02d}_{color}_{shape}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), render_frames(shape, color, "right", frames=1, seed=i)[0])
        rows.append({"problem_id": len(rows), "problem": "What color is the shape?", "options": [],
                     "solution": f"<answer>{color}</answer>", "problem_type": "free-form", "data_type": "image",
                     "path": rel, "data_source": "shapes"})
    out = root / "shapes.json"
    out.write_text(json.dumps(rows, indent=1))
    return out
