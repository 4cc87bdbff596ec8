"""The bundled default model's recipe: toy components built from scratch (model.py: `python -m pipeline.toy.model`)
and the toy VAE's training (vae.py: `python -m pipeline.toy.vae`); docs/default_model.md."""
