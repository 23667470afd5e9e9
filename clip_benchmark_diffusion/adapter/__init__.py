"""The clip_benchmark seam: a diffusion classifier behind CLIP's encode_text/encode_image."""
