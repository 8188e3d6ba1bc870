"""The tiny tri-modal demo of the masked-diffusion family (`megafusion demo --family masked_diffusion`):
corpus.py writes generated text / image-text / audio-text records and the evaluation prompts, audio.py makes and
classifies the tones, run.py runs corpus -> tokenizer -> preprocess -> train -> generate -> score -> report.
docs/masked_diffusion_demo.md."""
