"""The `megafusion demo` toolkit: a procedural visual world, its corpus, and a deterministic mini-GenEval.

- world.py     scenes (one or two colored shapes, named positions and relations), moving-shape videos, renderer
- captions.py  varied captions, canonical prompts, text-only world documents, caption parsing (synonyms)
- corpus.py    train parquet (the preprocessing record layout) + held-out evaluation set (JSONL + PNG)
- checker.py   model-free image analyser: objects' color / shape / position, relations, video direction
- scoring.py   accuracies per attribute against prompts, each with its chance level (plain dicts)
- report.py    image grid PNG, loss-curve PNG from metrics.jsonl, report.md

Nothing here imports torch: the toolkit runs wherever numpy, Pillow and pyarrow do (matplotlib for curves).
"""
